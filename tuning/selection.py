"""Model selection and measure-vs-gap correlation over finished trials (docs/results.md).

Everything here is a pure function of an explicit trial table: no Ray, MLflow or torch.

A *trial table* is a pandas DataFrame or an iterable of mappings, one per finished trial, with a
string ``trial_id`` and numeric metrics named as in :data:`METRICS`. A metric that a trial did not
report may be absent or NaN:

* a selection criterion ignores trials whose own metric is NaN;
* a correlation uses the pairs where both values are finite and is NaN when fewer than 3 remain.

Criteria live in one registry (name -> :class:`Criterion`). Built in: ``bound`` (the default, needs
no validation split), ``measure``, ``val_acc``, ``val_loss`` and ``oracle`` (clean test accuracy,
for evaluation only). More can be added with :func:`register_criterion`.

Ties. Within a criterion, trials are ordered by its metric, then by its tie-breakers (NaN last),
then by their position in the input. ``val_acc`` is a count over the validation split, so exact ties
at the top are common; it breaks them by lower ``val_loss``, then lower
``bound``. Because any deterministic tie-break flatters or penalises the criterion by luck,
:func:`expected_test_acc` and :func:`expected_regret` also score the pick under *random*
tie-breaking among the trials tied on the primary metric, as the selection study does
(docs/results.md).

Correlations follow Jiang et al. 2020, "Fantastic Generalization Measures and Where to Find Them"
(ICLR 2020, arXiv 1912.02178): Kendall τ between measure and gap over all trials, and the
granulated τ (their Ψ) per swept hyperparameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from trainables import metrics
from trainables.errors import HesstuneError
from trainables.records import correctness_from_text, labels_from_text

__all__ = [
    "CLEAN_AGREEMENT",
    "DEFAULT_CRITERION",
    "METRICS",
    "STRUCTURE_CUT",
    "SUMMARY_CRITERIA",
    "SUMMARY_MEASURES",
    "SUMMARY_TARGETS",
    "Criterion",
    "GranulatedKendall",
    "SelectionError",
    "cleaned_validation_accuracy",
    "correlations",
    "expected_regret",
    "expected_test_acc",
    "get_criterion",
    "granulated_kendall",
    "kendall_tau",
    "leaderboard",
    "list_criteria",
    "noise_looks_symmetric",
    "partial_kendall",
    "pearson_r",
    "rank",
    "ranking_agreement",
    "recommended_criterion",
    "register_criterion",
    "regret",
    "select",
    "spearman_rho",
    "summary",
    "validation_correctness",
]

Direction: TypeAlias = Literal["min", "max"]
TrialTable: TypeAlias = pd.DataFrame | Iterable[Mapping[str, Any]]
"""A DataFrame or an iterable of per-trial mappings (see the module docstring)."""

METRICS: tuple[str, ...] = metrics.TRIAL_METRICS
"""Metric names a trial record may carry; absent ones are read as NaN."""

DEFAULT_CRITERION = "bound"
SUMMARY_MEASURES: tuple[str, ...] = metrics.MEASURES
SUMMARY_TARGETS: tuple[str, ...] = metrics.GAP_TARGETS
SUMMARY_CRITERIA: tuple[str, ...] = ("bound", "measure", "val_acc", "val_loss")
_ORACLE_METRIC = "test_acc"
_KEY_COLUMNS: tuple[str, ...] = ("bound", "measure", "val_acc", "test_acc", "gap", "train_acc")


# --------------------------------------------------------------------------- criteria registry


@dataclass(frozen=True)
class Criterion:
    """How to rank trials: by ``metric`` in ``direction``, then by ``tie_breakers`` in order.

    ``evaluation_only`` marks criteria that look at held-out test data (the oracle); :func:`select`
    refuses them unless explicitly allowed.
    """

    name: str
    metric: str
    direction: Direction
    description: str
    evaluation_only: bool = False
    tie_breakers: tuple[tuple[str, Direction], ...] = ()
    needs: str = ""  # which trials have ``metric``: the error when a table lacks it

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


for _builtin in (
    Criterion(
        "bound",
        "bound",
        "min",
        "lowest Hessian generalization bound B = train loss + sqrt(C)*M (Ju et al. 2022); needs no validation split",
    ),
    Criterion(
        "measure",
        "measure",
        "min",
        "lowest Hessian distance measure M (label-free): M predicts the generalization gap, not accuracy; a "
        "trial that barely moved from the pretrained weights has M near 0 and wins, so rank gaps with it and "
        "pick models with another criterion",
    ),
    Criterion(
        "val_acc",
        "val_acc",
        "max",
        "highest noisy-validation accuracy; ties broken by lower val_loss, then lower bound",
        tie_breakers=(("val_loss", "min"), ("bound", "min")),
    ),
    Criterion("val_loss", "val_loss", "min", "lowest noisy-validation loss"),
    Criterion(
        "oracle",
        _ORACLE_METRIC,
        "max",
        "highest clean test accuracy; for evaluation (regret, ranking quality) only",
        evaluation_only=True,
    ),
):
    register_criterion(_builtin)


# --------------------------------------------------------------------------- trial table


def _frame(trials: TrialTable) -> pd.DataFrame:
    """Trial table as a DataFrame with a unique str ``trial_id`` and float columns for all METRICS."""
    frame = trials.copy() if isinstance(trials, pd.DataFrame) else pd.DataFrame(list(trials))
    frame = frame.reset_index(drop=True)
    if len(frame) and "trial_id" not in frame.columns:
        raise ValueError("every trial needs a 'trial_id'; the table has none")
    if "trial_id" not in frame.columns:
        frame["trial_id"] = pd.Series(dtype=str)
    if frame["trial_id"].isna().any():
        raise ValueError("'trial_id' is missing for some trials")
    frame["trial_id"] = frame["trial_id"].astype(str)
    duplicated = frame["trial_id"][frame["trial_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"trial_id values must be unique; repeated: {duplicated}")
    for metric in METRICS:
        frame[metric] = _numeric(frame, metric)
    return frame


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """Column as float64 (NaN if absent); ValueError naming the column if it is not numeric."""
    if column not in frame.columns:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    try:
        return pd.to_numeric(frame[column], errors="raise").astype(float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metric {column!r} must be numeric or NaN: {err}") from None


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """Numeric values of ``name``; ValueError if it is neither a known metric nor a column."""
    if name not in frame.columns:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)} or a table column")
    return _numeric(frame, name).to_numpy()


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


# --------------------------------------------------------------------------- correlation


def _finite_pairs(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """The (x_i, y_i) pairs where both are finite, as float64 arrays."""
    xs = np.asarray(x, dtype=float).ravel()
    ys = np.asarray(y, dtype=float).ravel()
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length; got {xs.size} and {ys.size}")
    keep = np.isfinite(xs) & np.isfinite(ys)
    return xs[keep], ys[keep]


def kendall_tau(x: Any, y: Any, *, min_pairs: int = 3) -> float:
    """Kendall's τ_b over the finite pairs (Kendall 1945, tie-corrected).

    τ_b = (n_c − n_d) / sqrt((n_0 − n_x)(n_0 − n_y)), with n_c / n_d the concordant / discordant
    pairs, n_0 = n(n−1)/2 and n_x, n_y the pairs tied in x, in y. Computed exactly in O(n²) time,
    O(n) memory. NaN with fewer than ``min_pairs`` finite pairs or when x or y is constant.
    """
    xs, ys = _finite_pairs(x, y)
    if xs.size < max(min_pairs, 2):
        return math.nan
    signed = untied_x = untied_y = 0.0
    for i in range(xs.size - 1):
        dx = np.sign(xs[i + 1 :] - xs[i])
        dy = np.sign(ys[i + 1 :] - ys[i])
        signed += float(dx @ dy)
        untied_x += float(np.abs(dx).sum())
        untied_y += float(np.abs(dy).sum())
    denominator = math.sqrt(untied_x * untied_y)
    return signed / denominator if denominator > 0 else math.nan


def pearson_r(x: Any, y: Any) -> float:
    """Pearson's r = cov(x, y) / (sd(x) sd(y)) over the finite pairs; NaN if < 3 or constant."""
    xs, ys = _finite_pairs(x, y)
    if xs.size < 3:
        return math.nan
    xc, yc = xs - xs.mean(), ys - ys.mean()
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denominator if denominator > 0 else math.nan


def spearman_rho(x: Any, y: Any) -> float:
    """Spearman's ρ = Pearson's r of the average ranks (ties share their mean rank)."""
    xs, ys = _finite_pairs(x, y)
    if xs.size < 3:
        return math.nan
    return pearson_r(rankdata(xs), rankdata(ys))


def partial_kendall(x: Any, y: Any, z: Any) -> float:
    """Kendall's partial τ of x and y given z (Kendall 1942), over triples where all are finite.

    τ_xy·z = (τ_xy − τ_xz τ_yz) / sqrt((1 − τ_xz²)(1 − τ_yz²)). NaN with fewer than 3 triples, an
    undefined τ, or |τ_xz| = 1 or |τ_yz| = 1.
    """
    xs, ys, zs = (np.asarray(v, dtype=float).ravel() for v in (x, y, z))
    if not xs.shape == ys.shape == zs.shape:
        raise ValueError(f"x, y and z must have the same length; got {xs.size}, {ys.size}, {zs.size}")
    keep = np.isfinite(xs) & np.isfinite(ys) & np.isfinite(zs)
    t_xy, t_xz, t_yz = (kendall_tau(a[keep], b[keep]) for a, b in ((xs, ys), (xs, zs), (ys, zs)))
    denominator = math.sqrt(max((1 - t_xz**2) * (1 - t_yz**2), 0.0))
    if not denominator > 0:  # also catches NaN
        return math.nan
    return (t_xy - t_xz * t_yz) / denominator


def correlations(
    trials: TrialTable,
    measures: Sequence[str] = SUMMARY_MEASURES,
    target: str = "gap",
) -> pd.DataFrame:
    """Kendall τ_b, Spearman ρ and Pearson r between each measure and ``target``.

    One row per measure (the index), columns ``kendall``, ``spearman``, ``pearson`` and ``n`` (the
    number of finite pairs used). Correlations are NaN when n < 3.
    """
    frame = _frame(trials)
    y = _column(frame, target)
    rows = {}
    for measure in measures:
        x, ys = _finite_pairs(_column(frame, measure), y)
        rows[measure] = {
            "kendall": kendall_tau(x, ys),
            "spearman": spearman_rho(x, ys),
            "pearson": pearson_r(x, ys),
            "n": x.size,
        }
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["kendall", "spearman", "pearson", "n"])
    return table.astype({"n": int})


@dataclass(frozen=True)
class GranulatedKendall:
    """Granulated Kendall τ: ψ per hyperparameter axis and their mean Ψ (NaN where undefined)."""

    per_axis: Mapping[str, float]
    mean: float


def _axis_tau(frame: pd.DataFrame, measure: str, target: str, axis: str, others: list[str]) -> float:
    """ψ_axis: mean τ within groups that share all other axes' values and vary ``axis``."""
    groups = frame.groupby(others, dropna=False, sort=False) if others else [(None, frame)]
    taus = [
        kendall_tau(group[measure], group[target], min_pairs=2)
        for _, group in groups
        if len(group) >= 2 and group[axis].nunique(dropna=False) > 1
    ]
    finite = [t for t in taus if math.isfinite(t)]
    return float(np.mean(finite)) if finite else math.nan


def granulated_kendall(trials: TrialTable, measure: str, target: str, by: Sequence[str]) -> GranulatedKendall:
    """Granulated Kendall coefficient Ψ of Jiang et al. 2020 (ICLR, arXiv 1912.02178, §4).

    For each hyperparameter column h in ``by``: group the trials (with finite measure and target)
    whose other ``by`` columns are equal (NaN counts as a value), keep groups of ≥ 2 trials in which
    h takes ≥ 2 values, compute τ_b(measure, target) within each (2 trials suffice here, as in the
    paper), and average over groups: ψ_h. Ψ = mean of the finite ψ_h. An axis with no such group (or
    only constant groups) has ψ_h = NaN; Ψ is NaN if every ψ_h is. Needs a grid: with continuously
    sampled hyperparameters no two trials share the other values.
    """
    frame = _frame(trials)
    missing = [h for h in by if h not in frame.columns]
    if missing:
        raise ValueError(f"hyperparameter columns {missing} are not in the trial table")
    if len(set(by)) != len(by):
        raise ValueError(f"'by' has repeated columns: {list(by)}")
    frame = frame.assign(_m=_column(frame, measure), _t=_column(frame, target))
    frame = frame[np.isfinite(frame["_m"]) & np.isfinite(frame["_t"])]
    per_axis = {h: _axis_tau(frame, "_m", "_t", h, [o for o in by if o != h]) for h in by}
    finite = [v for v in per_axis.values() if math.isfinite(v)]
    return GranulatedKendall(per_axis, float(np.mean(finite)) if finite else math.nan)


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


# --------------------------------------------------------------------------- sweep summary


def _correlation_stats(frame: pd.DataFrame) -> dict[str, float]:
    """kendall_/spearman_/pearson_<measure>_<target> and partial_kendall_<measure>_<target>."""
    stats: dict[str, float] = {}
    train_loss = frame["train_loss"].to_numpy()
    for target in SUMMARY_TARGETS:
        table = correlations(frame, SUMMARY_MEASURES, target)
        for measure, row in table.iterrows():
            for method in ("kendall", "spearman", "pearson"):
                stats[f"{method}_{measure}_{target}"] = float(row[method])
            partial = partial_kendall(frame[measure], frame[target], train_loss)
            stats[f"partial_kendall_{measure}_{target}_given_train_loss"] = partial
    return stats


def _selection_stats(frame: pd.DataFrame) -> dict[str, float]:
    """regret_<criterion>, expected_regret_val_acc, agreement_* and oracle_test_acc; with a
    ``n_val`` column also the study's recommended ``val_band_bound``."""
    criteria = list(SUMMARY_CRITERIA)
    if "n_val" in frame and "val_band_bound" not in frame:
        frame = add_selection_metrics(frame)
    if "val_band_bound" in frame:
        criteria.append("val_band_bound")
    for extra in ("val_acc_corr", "val_acc_clean"):
        if extra in frame and np.isfinite(frame[extra].to_numpy(float)).any():
            criteria.append(extra)
    stats = {f"regret_{c}": regret(frame, c) for c in criteria}
    stats["expected_regret_val_acc"] = expected_regret(frame, "val_acc")
    stats["agreement_bound_val_acc"] = ranking_agreement(frame, "bound", "val_acc")
    for c in criteria:
        stats[f"agreement_{c}_oracle"] = ranking_agreement(frame, c, "oracle")
    stats["oracle_test_acc"] = _oracle_best(frame)
    return stats


def summary(trials: TrialTable) -> dict[str, float]:
    """Sweep-level statistics for the MLflow parent run; flat str -> float, NaN allowed.

    Keys, with m in SUMMARY_MEASURES (measure, bound, trace, lambda_max, distance), t in gap and
    gap_clean and c in SUMMARY_CRITERIA (bound, measure, val_acc, val_loss):

    * ``kendall_<m>_<t>``, ``spearman_<m>_<t>``, ``pearson_<m>_<t>``;
    * ``partial_kendall_<m>_<t>_given_train_loss`` (docs/results.md: the raw gap is largely
      "how much it fit", so τ partial on train loss is the more telling number);
    * ``regret_<c>``, ``expected_regret_val_acc`` (random tie-breaking); c also
      ``val_band_bound`` when the trials report ``n_val`` (:func:`add_selection_metrics`) and
      ``val_acc_corr`` when they report it (every trial with a validation split does);
    * ``agreement_bound_val_acc`` and ``agreement_<c>_oracle`` (ranking quality vs test accuracy);
    * ``oracle_test_acc`` and ``n_trials``.
    """
    frame = _frame(trials)
    stats = {**_correlation_stats(frame), **_selection_stats(frame)}
    stats["n_trials"] = float(len(frame))
    return stats


# =========================================================================== criteria from the selection study
#
# Added by the selection study (issue #6; benchmarks/selection_study.py, numbers in docs/results.md).
# Nothing above this line changed behaviour. These criteria rank by *derived* metrics that depend
# on the whole sweep or on the noise model, so a caller first adds them with
# :func:`add_selection_metrics`; without it :func:`select` raises ValueError naming the missing metric.


def validation_correctness(frame: pd.DataFrame, n_val: np.ndarray | float) -> np.ndarray | None:
    """[trials, n_val] booleans: which validation samples each trial got right, decoded from its
    ``val_correct`` hex text (rows of trials without a val_acc stay False), or None when some
    trial with a val_acc lacks that text."""
    acc = frame["val_acc"].to_numpy(float)
    scored = np.isfinite(acc)
    texts = frame["val_correct"].to_numpy(object) if "val_correct" in frame else np.full(len(frame), None)
    sizes = np.broadcast_to(n_val, acc.shape)
    if not all(isinstance(t, str) and len(t) * 4 >= sizes[i] > 0 for i, t in enumerate(texts) if scored[i]):
        return None
    n = int(sizes[scored][0]) if scored.any() else 0
    correct = np.zeros((len(frame), n), dtype=bool)
    for i in np.flatnonzero(scored):
        correct[i] = correctness_from_text(texts[i], n)
    return correct


CLEAN_AGREEMENT = 0.8  # fixed before val_acc_clean was scored (docs/results.md)


def cleaned_validation_accuracy(frame: pd.DataFrame, n_val: np.ndarray | float) -> np.ndarray | None:
    """``val_acc_clean``: each trial's accuracy on the validation samples whose noisy label the
    trials' consensus does not contradict. A sample is set aside when at least
    :data:`CLEAN_AGREEMENT` of the trials predict one class and that class is not its label (the
    trials predicting it got the sample wrong). None when some trial with a val_acc lacks its
    per-sample predictions ``val_pred`` or correctness ``val_correct``; NaN for trials without a
    val_acc."""
    correct = validation_correctness(frame, n_val)
    texts = frame["val_pred"].to_numpy(object) if "val_pred" in frame else np.full(len(frame), None)
    scored = np.isfinite(frame["val_acc"].to_numpy(float))
    if correct is None or not scored.any() or not all(isinstance(texts[i], str) for i in np.flatnonzero(scored)):
        return None
    rows = np.flatnonzero(scored)
    pred = np.stack([labels_from_text(texts[i])[: correct.shape[1]] for i in rows])
    right = correct[rows]
    if pred.shape[1] != right.shape[1]:
        return None
    k = int(pred.max()) + 1
    votes = np.stack([np.bincount(column, minlength=k) for column in pred.T])  # [n_val, k]
    consensus, share = votes.argmax(1), votes.max(1) / len(rows)
    voters_right = (right & (pred == consensus)).any(0)  # a voter right on the sample: consensus = label
    keep = ~((share >= CLEAN_AGREEMENT) & ~voters_right)
    out = np.full(len(frame), np.nan)
    if keep.any():
        out[rows] = right[:, keep].mean(1)
    return out


def paired_validation_band(frame: pd.DataFrame, n_val: np.ndarray, z: float = 1.0) -> np.ndarray | None:
    """Trials not significantly worse than the top one on the same validation samples (McNemar),
    or None when some trial with a val_acc lacks its per-sample correctness ``val_correct``."""
    correct = validation_correctness(frame, n_val)
    if correct is None:
        return None
    acc = frame["val_acc"].to_numpy(float)
    scored = np.isfinite(acc)
    top = np.flatnonzero(acc == np.nanmax(acc))
    ref = top[np.argmin(frame["val_loss"].to_numpy(float)[top])] if len(top) > 1 else top[0]
    wins = (correct[ref] & ~correct).sum(1)  # the top trial right, this one wrong
    losses = (~correct[ref] & correct).sum(1)
    return scored & ((wins - losses) <= z * np.sqrt(wins + losses))


# noise_structure of F above which the noise counts as class-dependent: the midpoint of the gap
# on Fashion-MNIST, where the default estimate scored 0.03–0.24 under symmetric noise and
# 0.35–0.92 under pair and correlated noise (54 draws, benchmarks/transition_estimators.py;
# docs/transition.md, "Which noise case a sweep is in").
STRUCTURE_CUT = 0.29


def noise_looks_symmetric(trials: TrialTable) -> bool:
    """Whether the F the trials used (median ``f_structure``) spreads wrong labels evenly; False
    when the trials report no structure (no F, two classes, or older sweeps)."""
    frame = trials if isinstance(trials, pd.DataFrame) else pd.DataFrame(list(trials))
    if "f_structure" not in frame:
        return False
    structure = pd.to_numeric(frame["f_structure"], errors="coerce").to_numpy(float)
    return bool(np.isfinite(structure).any()) and float(np.nanmedian(structure)) < STRUCTURE_CUT


def recommended_criterion(trials: TrialTable) -> str:
    """The selection both studies recommend (docs/results.md, "Decision"). With a validation split
    (finite ``val_acc`` and ``n_val`` > 0): ``val_acc`` when the F the trials used looks symmetric
    (:func:`noise_looks_symmetric`: noisy validation accuracy is then unbiased, and the bound only
    added variance), else ``val_band_bound``. Without one, ``bound``."""
    frame = _frame(trials)
    has_val = "n_val" in frame and bool((frame["n_val"].to_numpy(float) > 0).any())
    if not (has_val and np.isfinite(frame["val_acc"].to_numpy(float)).any()):
        return "bound"
    return "val_acc" if noise_looks_symmetric(frame) else "val_band_bound"


def add_selection_metrics(
    trials: TrialTable,
    *,
    n_val: int | None = None,
    noise_entropy: float | np.ndarray | None = None,
    band_z: float = 1.0,
) -> pd.DataFrame:
    """The trial table with the derived metrics of the study's criteria added.

    * ``val_band_bound``: ``bound`` for the trials in the validation band, NaN for the others (so
      the criterion of the same name picks the lowest B among near-equal validation scores). The
      band is *paired* when every trial with a ``val_acc`` has a ``val_correct`` (the hex of its
      packed per-sample correctness, which trials report at their end): the trials not
      significantly worse than the top one on the same samples, losses − wins ≤ ``band_z`` ·
      √(losses + wins) (McNemar), the top one being the best ``val_acc`` (ties: lowest
      ``val_loss``). Otherwise *unpaired*: ``val_acc`` within ``band_z`` binomial standard errors
      √(a(1 − a)/n_val) of the best a. The study measured the paired band (docs/results.md: −0.4
      points of regret against val_acc; unpaired −0.0). ``frame.attrs["val_band"]`` says which.
      ``n_val``: the validation size (or a ``n_val`` column). Needs ``val_acc`` and ``bound``.
    * ``val_acc_clean`` (when every trial with a ``val_acc`` also has ``val_pred`` and
      ``val_correct``): accuracy on the validation samples the trials' consensus does not
      contradict (:func:`cleaned_validation_accuracy`).
    * ``bound_floor`` (when the table has ``bound_loss``, ``bound_C``, ``measure`` and H_F:
      ``noise_entropy`` or a ``noise_entropy`` column, which trials report from the F they used):
      max(L̂, H_F) + √C · M, B with its loss term floored at the noise entropy
      (docs/measures.md §4), which removes B's reward for fitting noisy labels.
    """
    frame = _frame(trials)
    if noise_entropy is None and "noise_entropy" in frame and np.isfinite(_numeric(frame, "noise_entropy")).all():
        noise_entropy = _numeric(frame, "noise_entropy").to_numpy()
    acc, bound = frame["val_acc"].to_numpy(), frame["bound"].to_numpy()
    if np.isfinite(acc).any():
        size = n_val if n_val is not None else (frame["n_val"].to_numpy(float) if "n_val" in frame else None)
        if size is None:
            raise SelectionError("val_band_bound needs the validation size: pass n_val or add a 'n_val' column")
        paired = paired_validation_band(frame, np.asarray(size, dtype=float), band_z)
        frame.attrs["val_band"] = "unpaired" if paired is None else "paired"
        if paired is None:
            best = float(np.nanmax(acc))
            width = band_z * np.sqrt(best * (1 - best) / np.asarray(size, dtype=float))
            paired = acc >= best - width - 1e-12
        frame["val_band_bound"] = np.where(paired, bound, np.nan)
        clean = cleaned_validation_accuracy(frame, np.asarray(size, dtype=float))
        if clean is not None:  # trials that predate val_pred cannot be cleaned: the column stays absent
            frame["val_acc_clean"] = clean
    else:
        frame["val_band_bound"] = np.nan
    if noise_entropy is not None and {"bound_loss", "bound_C"} <= set(frame.columns):
        loss = np.maximum(_numeric(frame, "bound_loss").to_numpy(), noise_entropy)
        frame["bound_floor"] = loss + np.sqrt(_numeric(frame, "bound_C").to_numpy()) * frame["measure"].to_numpy()
    return frame


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
