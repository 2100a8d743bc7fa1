"""Correlations between a measure and the gap: Kendall τ_b, Spearman, Pearson, partial and
granulated Kendall (Jiang et al. 2020), NaN below 3 finite pairs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from tuning.selection._table import SUMMARY_MEASURES, TrialTable, _column, _frame

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
    """Kendall's τ_b over the finite pairs (Kendall 1945, tie-corrected; ``scipy.stats.kendalltau``).

    τ_b = (n_c − n_d) / sqrt((n_0 − n_x)(n_0 − n_y)), with n_c / n_d the concordant / discordant
    pairs, n_0 = n(n−1)/2 and n_x, n_y the pairs tied in x, in y. NaN with fewer than
    ``min_pairs`` finite pairs or when x or y is constant.
    """
    xs, ys = _finite_pairs(x, y)
    if xs.size < max(min_pairs, 2):
        return math.nan
    return _statistic(stats.kendalltau, xs, ys)


def pearson_r(x: Any, y: Any) -> float:
    """Pearson's r over the finite pairs (``scipy.stats.pearsonr``); NaN if < 3 or constant."""
    xs, ys = _finite_pairs(x, y)
    return _statistic(stats.pearsonr, xs, ys) if xs.size >= 3 else math.nan


def spearman_rho(x: Any, y: Any) -> float:
    """Spearman's ρ, Pearson's r of the average ranks (``scipy.stats.spearmanr``); NaN if < 3 or
    constant."""
    xs, ys = _finite_pairs(x, y)
    return _statistic(stats.spearmanr, xs, ys) if xs.size >= 3 else math.nan


def _statistic(test: Any, xs: np.ndarray, ys: np.ndarray) -> float:
    """The statistic of a scipy correlation test; NaN (not a warning) when x or y is constant."""
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return math.nan
    return float(test(xs, ys).statistic)


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
