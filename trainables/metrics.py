"""The names of what a trial reports, in one place (docs/design.md).

The loop and the measures produce these keys; the trainable adds the objective and Ray its
bookkeeping; tracking, selection, the report and ``hesstune train`` read them. A name a module
needs is imported from here, so adding a metric means touching this vocabulary once.
"""

from __future__ import annotations

__all__ = [
    "DIAGNOSTICS",
    "FINAL",
    "GAP_TARGETS",
    "HEADLINE",
    "MEASURES",
    "OBJECTIVE_KEY",
    "RAY_KEYS",
    "RECOVERY_KEY",
    "TAG_RESULTS",
    "TEXT_RESULTS",
    "TRIAL_INDEX_KEY",
    "TRIAL_METRICS",
]

# What selection reads of a finished trial; absent ones are NaN (tuning.selection).
TRIAL_METRICS: tuple[str, ...] = (
    "train_loss",
    "train_acc",
    "val_acc",
    "val_loss",
    "test_loss",
    "test_acc",
    "gap",
    "gap_clean",
    "measure",
    "measure_mean",
    "bound",
    "trace",
    "lambda_max",
    "distance",
)

# The measures correlated with the true gap in every sweep's summary and report, and the targets.
MEASURES: tuple[str, ...] = ("measure", "bound", "trace", "lambda_max", "distance")
GAP_TARGETS: tuple[str, ...] = ("gap", "gap_clean")
# Diagnostics, not selection: a sweep measures them on every N-th trial (--diagnostics-every).
DIAGNOSTICS: tuple[str, ...] = ("trace", "lambda_max")

# MLflow's compare view lists metric keys in code-point order: these keep bare names and are
# logged first, everything else goes under "xtra/" (tuning.tracking).
HEADLINE: tuple[str, ...] = (
    "bound", "measure", "gap", "val_acc", "test_acc", "train_acc", "val_loss", "train_loss", "distance", "trace",
    "lambda_max", "val_acc_corr",
)  # fmt: skip

# ``hesstune train``'s final table.
FINAL: tuple[str, ...] = (
    "train_loss",
    "train_acc",
    "val_acc",
    "test_loss",
    "test_acc",
    "gap",
    "gap_clean",
    "memorized",
    "measure",
    "bound",
    "bound_C",
    "trace",
    "trace_se",
    "lambda_max",
    "lambda_max_residual",
    "distance",
    "backward_passes_per_step",
    "eval_s",
    "measure_s",
    "trace_s",
    "lambda_max_s",
)

# Text a trial reports at its end (trainables.records): long text stored as tags split in pieces,
# short text as one tag ``hesstune.<key>`` (``transition``: which noise matrix F the trial used).
TEXT_RESULTS: tuple[str, ...] = ("val_correct", "val_pred")
TAG_RESULTS: tuple[str, ...] = ("transition",)

# Text a trial reports the first time it reports after a damaged checkpoint: tag
# ``hesstune.checkpoint_recovery`` (what was damaged, and where the trial resumed from).
RECOVERY_KEY = "checkpoint_recovery"

OBJECTIVE_KEY = "objective"  # the searched metric, as the trainable reports it to Ray
TRIAL_INDEX_KEY = "_trial_index"  # the trial's number in its config ("_": not a RunConfig value)

# Ray's bookkeeping in a result: not trial metrics.
RAY_KEYS: frozenset[str] = frozenset(
    {
        "timestamp",
        "done",
        "training_iteration",
        "trial_id",
        "date",
        "pid",
        "hostname",
        "node_ip",
        "time_since_restore",
        "iterations_since_restore",
        "time_this_iter_s",
        "checkpoint_dir_name",
        "should_checkpoint",
        "config",
    }
)
