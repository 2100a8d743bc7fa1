"""The statistics a sweep logs on its parent run after every finished trial."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tuning.selection._table import SUMMARY_MEASURES, SUMMARY_TARGETS, TrialTable, _frame
from tuning.selection.criteria import _oracle_best, expected_regret, per_trial_criteria, ranking_agreement, regret
from tuning.selection.derived import add_selection_metrics
from tuning.selection.statistics import correlations, partial_kendall

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
    criteria = list(per_trial_criteria())
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
    gap_clean and c in the per-trial criteria (bound, measure, val_acc, val_loss):

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
