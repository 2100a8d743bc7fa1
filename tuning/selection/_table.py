"""The trial table: constants, types and the checked DataFrame every selection function reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeAlias

import numpy as np
import pandas as pd

from trainables import metrics

Direction: TypeAlias = Literal["min", "max"]
TrialTable: TypeAlias = pd.DataFrame | Iterable[Mapping[str, Any]]
"""A DataFrame or an iterable of per-trial mappings (see the module docstring)."""

METRICS: tuple[str, ...] = metrics.TRIAL_METRICS
"""Metric names a trial record may carry; absent ones are read as NaN."""

DEFAULT_CRITERION = "bound"
SUMMARY_MEASURES: tuple[str, ...] = metrics.MEASURES
SUMMARY_TARGETS: tuple[str, ...] = metrics.GAP_TARGETS
_ORACLE_METRIC = "test_acc"
_KEY_COLUMNS: tuple[str, ...] = ("bound", "measure", "val_acc", "test_acc", "gap", "train_acc")


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
