"""Selection criteria: one registry (name -> :class:`Criterion`), ranking, selection and regret."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trainables.errors import HesstuneError
from tuning.selection._table import (
    _KEY_COLUMNS,
    _ORACLE_METRIC,
    DEFAULT_CRITERION,
    Direction,
    TrialTable,
    _column,
    _frame,
)
from tuning.selection.statistics import kendall_tau

# --------------------------------------------------------------------------- criteria registry


@dataclass(frozen=True)
class Criterion:
    """How to rank trials: by ``metric`` in ``direction``, then by ``tie_breakers`` in order.

    ``evaluation_only`` marks criteria that look at held-out test data (the oracle); :func:`select`
    refuses them unless explicitly allowed. ``per_trial`` marks criteria whose metric every trial
    reports (:func:`per_trial_criteria`).
    """

    name: str
    metric: str
    direction: Direction
    description: str
    evaluation_only: bool = False
    tie_breakers: tuple[tuple[str, Direction], ...] = ()
    needs: str = ""  # which trials have ``metric``: the error when a table lacks it
    # every trial reports ``metric`` itself, so Optuna can optimise it (--objective) and each
    # sweep's summary scores it; False for metrics derived over a whole sweep (or evaluation only)
    per_trial: bool = False

    def __post_init__(self) -> None:
        for metric, direction in ((self.metric, self.direction), *self.tie_breakers):
            if direction not in ("min", "max"):
                raise ValueError(
                    f"criterion {self.name!r}: direction for {metric!r} is {direction!r}; use 'min' or 'max'"
                )


class SelectionError(HesstuneError):
    """A selection that cannot be made as asked (unknown criterion, trials without its metric)."""


_REGISTRY: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion, *, overwrite: bool = False) -> Criterion:
    """Add ``criterion`` to the registry under its name; returns it.

    Raises ValueError if the name is taken and ``overwrite`` is False.
    """
    if criterion.name in _REGISTRY and not overwrite:
        raise ValueError(f"criterion {criterion.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    """The registered criterion called ``name``; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SelectionError(f"unknown criterion {name!r}; known: {', '.join(list_criteria())}") from None


def list_criteria() -> list[str]:
    """Names of all registered criteria, sorted."""
    return sorted(_REGISTRY)


def per_trial_criteria() -> tuple[str, ...]:
    """Criteria whose metric every trial reports (search objectives, the sweep summary's scores),
    in registration order."""
    return tuple(name for name, c in _REGISTRY.items() if c.per_trial and not c.evaluation_only)


for _builtin in (
    Criterion(
        "bound",
        "bound",
        "min",
        "lowest Hessian generalization bound B = train loss + sqrt(C)*M (Ju et al. 2022); needs no validation split",
        per_trial=True,
    ),
    Criterion(
        "measure",
        "measure",
        "min",
        "lowest Hessian distance measure M (label-free): M predicts the generalization gap, not accuracy; a "
        "trial that barely moved from the pretrained weights has M near 0 and wins, so rank gaps with it and "
        "pick models with another criterion",
        per_trial=True,
    ),
    Criterion(
        "val_acc",
        "val_acc",
        "max",
        "highest noisy-validation accuracy; ties broken by lower val_loss, then lower bound",
        tie_breakers=(("val_loss", "min"), ("bound", "min")),
        per_trial=True,
    ),
    Criterion("val_loss", "val_loss", "min", "lowest noisy-validation loss", per_trial=True),
    Criterion(
        "oracle",
        _ORACLE_METRIC,
        "max",
        "highest clean test accuracy; for evaluation (regret, ranking quality) only",
        evaluation_only=True,
    ),
):
    register_criterion(_builtin)


# --------------------------------------------------------------------------- ranking and selection


def _sort_key(values: np.ndarray, direction: Direction) -> np.ndarray:
    """Ascending key: negate for 'max'; NaN goes last."""
    key = values if direction == "min" else -values
    return np.where(np.isnan(key), np.inf, key)


def _ranked_positions(frame: pd.DataFrame, criterion: Criterion) -> np.ndarray:
    """Row positions of trials with a non-NaN criterion metric, best first."""
    if criterion.needs and criterion.metric not in frame.columns:
        raise SelectionError(f"criterion {criterion.name!r} needs {criterion.needs}; these trials have none")
    primary = _column(frame, criterion.metric)
    eligible = np.flatnonzero(~np.isnan(primary))
    keys = [np.arange(len(frame))]  # last resort: input order
    for metric, direction in reversed(criterion.tie_breakers):
        keys.append(_sort_key(_column(frame, metric), direction))
    keys.append(_sort_key(primary, criterion.direction))
    order = np.lexsort([k[eligible] for k in keys])  # lexsort sorts by the last key first
    return eligible[order]


def rank(trials: TrialTable, criterion: str = DEFAULT_CRITERION) -> list[str]:
    """Trial ids ordered best first by ``criterion``; trials with a NaN criterion metric are left out.

    Ranking by an evaluation-only criterion is allowed (for leaderboards); only :func:`select`
    guards it.
    """
    frame = _frame(trials)
    return frame["trial_id"].iloc[_ranked_positions(frame, get_criterion(criterion))].tolist()


def select(trials: TrialTable, criterion: str = DEFAULT_CRITERION, *, allow_oracle: bool = False) -> str:
    """The trial_id that ``criterion`` picks (the first of :func:`rank`).

    Raises ValueError for an evaluation-only criterion (the oracle) unless ``allow_oracle`` is True,
    and when no trial has a finite value of the criterion's metric.
    """
    chosen = get_criterion(criterion)
    if chosen.evaluation_only and not allow_oracle:
        raise SelectionError(
            f"criterion {criterion!r} uses {chosen.metric!r} and is for evaluation only, never for "
            "selection; pass allow_oracle=True to evaluate with it"
        )
    ranked = rank(trials, criterion)
    if not ranked:
        raise SelectionError(f"no trial has a value for {chosen.metric!r}; cannot select by {criterion!r}")
    return ranked[0]


def _oracle_best(frame: pd.DataFrame) -> float:
    """Highest finite test accuracy in the sweep, NaN if none."""
    test_acc = frame[_ORACLE_METRIC].to_numpy()
    return float(np.nanmax(test_acc)) if np.isfinite(test_acc).any() else math.nan


def regret(trials: TrialTable, criterion: str = DEFAULT_CRITERION) -> float:
    """Selection regret = max test_acc over all trials − test_acc of the trial ``criterion`` picks.

    Ties are broken deterministically as in :func:`rank`. NaN when the criterion can pick nothing or
    a needed test accuracy is missing. Regret of ``oracle`` is 0 by construction.
    """
    frame = _frame(trials)
    positions = _ranked_positions(frame, get_criterion(criterion))
    if positions.size == 0:
        return math.nan
    return _oracle_best(frame) - float(frame[_ORACLE_METRIC].iloc[positions[0]])


def expected_test_acc(trials: TrialTable, criterion: str = DEFAULT_CRITERION) -> float:
    """Expected test_acc of the pick when ties on the primary metric are broken uniformly at random.

    E = mean of test_acc over the trials whose criterion metric equals the best value exactly
    (trials in the tie with NaN test_acc are left out). NaN if nothing can be picked.
    """
    frame = _frame(trials)
    chosen = get_criterion(criterion)
    positions = _ranked_positions(frame, chosen)
    if positions.size == 0:
        return math.nan
    primary = frame[chosen.metric].to_numpy()
    tied = frame[_ORACLE_METRIC].to_numpy()[primary == primary[positions[0]]]
    return float(np.mean(tied[np.isfinite(tied)])) if np.isfinite(tied).any() else math.nan


def expected_regret(trials: TrialTable, criterion: str = "val_acc") -> float:
    """Regret under random tie-breaking: max test_acc − :func:`expected_test_acc` (docs/results.md)."""
    return _oracle_best(_frame(trials)) - expected_test_acc(trials, criterion)


def leaderboard(trials: TrialTable, criterion: str = DEFAULT_CRITERION) -> pd.DataFrame:
    """Trials ordered by ``criterion`` with a 1-based ``rank`` column and the key metrics.

    Columns: rank, trial_id, the criterion metric and its tie-breakers, then bound, measure, val_acc,
    test_acc, gap, train_acc. Trials the criterion cannot rank (NaN metric) come last with rank <NA>.
    """
    frame = _frame(trials)
    chosen = get_criterion(criterion)
    ranked = _ranked_positions(frame, chosen)
    unranked = np.setdiff1d(np.arange(len(frame)), ranked)
    metrics = [chosen.metric, *(m for m, _ in chosen.tie_breakers), *_KEY_COLUMNS]
    columns = ["trial_id", *dict.fromkeys(metrics)]
    board = frame.iloc[np.concatenate([ranked, unranked])][columns].reset_index(drop=True)
    ranks = [*range(1, ranked.size + 1), *([pd.NA] * unranked.size)]
    board.insert(0, "rank", pd.array(ranks, dtype="Int64"))
    return board


def _goodness(frame: pd.DataFrame, criterion: Criterion) -> np.ndarray:
    """Criterion metric signed so that larger means better."""
    values = _column(frame, criterion.metric)
    return values if criterion.direction == "max" else -values


def ranking_agreement(trials: TrialTable, a: str = "bound", b: str = "val_acc") -> float:
    """Kendall τ_b between the orderings of criteria ``a`` and ``b`` on their primary metrics.

    Each metric is signed so larger is better (``min`` criteria are negated), so +1 means both put
    the trials in the same order. With b = "oracle" this is the ranking quality of ``a`` against
    clean test accuracy (docs/results.md). Tie-breakers are ignored; NaN with < 3 common trials.
    """
    frame = _frame(trials)
    return kendall_tau(_goodness(frame, get_criterion(a)), _goodness(frame, get_criterion(b)))


for _study in (
    Criterion(
        "val_band_bound",
        "val_band_bound",
        "min",
        "lowest Hessian bound B among trials whose noisy-validation accuracy is not significantly worse than "
        "the best trial's on the same samples (paired; unpaired, within one binomial standard error, for trials "
        "that did not report per-sample correctness); ties broken by higher val_acc",
        tie_breakers=(("val_acc", "max"),),
        needs="trials that report val_acc, bound and n_val (a validation split)",
    ),
    Criterion(
        "val_acc_clean",
        "val_acc_clean",
        "max",
        "highest noisy-validation accuracy on the samples whose label the trials' 80 % consensus does not "
        "contradict (no noise matrix, no Hessian); ties broken by higher val_acc, then lower val_loss",
        tie_breakers=(("val_acc", "max"), ("val_loss", "min")),
        needs="trials that report their per-sample validation predictions (val_pred; sweeps since this version)",
    ),
    Criterion(
        "val_acc_corr",
        "val_acc_corr",
        "max",
        "highest bias-corrected noisy-validation accuracy mean (F^-1)[noisy label, prediction], unbiased for the "
        "clean accuracy when the noise matrix F is right (injected and revealed, else estimated); where F is "
        "ill-conditioned (cond > 10) trials report plain val_acc instead and the report says so; not "
        "Hessian-based; ties broken by lower val_loss, then lower bound",
        tie_breakers=(("val_loss", "min"), ("bound", "min")),
        needs="trials with a validation split (they report it with the noise matrix F they used)",
    ),
    Criterion(
        "bound_floor",
        "bound_floor",
        "min",
        "lowest B with its loss term floored at the noise entropy H_F of the noise matrix F (trials "
        "report the H_F of the F they used, injected or estimated, as noise_entropy); no validation split needed",
        needs="trials that report noise_entropy (every trial does, from the noise matrix it used)",
    ),
):
    register_criterion(_study)
