"""The Pareto front of a multi-objective search: the trials no other trial dominates.

A trial dominates another when it is at least as good on every objective and strictly better on
one. Trials with a NaN objective are left out: they have no place to be compared in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tuning.selection._table import Direction, TrialTable, _column, _frame

__all__ = ["pareto_front"]


def pareto_front(trials: TrialTable, objectives: Sequence[tuple[str, Direction]]) -> pd.DataFrame:
    """The non-dominated trials under ``objectives`` ((metric, "min" | "max") pairs), ordered by
    the first objective, best first; columns ``trial_id`` and the objectives' metrics."""
    if not objectives:
        raise ValueError("a Pareto front needs at least one objective")
    frame = _frame(trials)
    names = [metric for metric, _ in objectives]
    signs = np.array([1.0 if direction == "min" else -1.0 for _, direction in objectives])
    values = np.column_stack([_column(frame, m) for m in names]) * signs  # every objective: lower is better
    finite = np.isfinite(values).all(axis=1)
    frame, values = frame[finite].reset_index(drop=True), values[finite]
    no_worse = (values[:, None, :] <= values[None, :, :]).all(axis=2)  # [i, j]: i is nowhere worse than j
    better = (values[:, None, :] < values[None, :, :]).any(axis=2)
    dominated = (no_worse & better).any(axis=0)
    front = frame.loc[~dominated, ["trial_id", *names]]
    return front.sort_values(names[0], ascending=objectives[0][1] == "min", kind="stable").reset_index(drop=True)
