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

from tuning.selection._table import (
    DEFAULT_CRITERION,
    METRICS,
    SUMMARY_MEASURES,
    SUMMARY_TARGETS,
    TrialTable,
)
from tuning.selection.criteria import (
    Criterion,
    SelectionError,
    expected_regret,
    expected_test_acc,
    get_criterion,
    leaderboard,
    list_criteria,
    per_trial_criteria,
    rank,
    ranking_agreement,
    register_criterion,
    regret,
    select,
)
from tuning.selection.derived import (
    CLEAN_AGREEMENT,
    STRUCTURE_CUT,
    add_selection_metrics,
    cleaned_validation_accuracy,
    noise_looks_symmetric,
    paired_validation_band,
    recommended_criterion,
    validation_correctness,
)
from tuning.selection.pareto import pareto_front
from tuning.selection.statistics import (
    GranulatedKendall,
    correlations,
    granulated_kendall,
    kendall_tau,
    partial_kendall,
    pearson_r,
    spearman_rho,
)
from tuning.selection.summary import summary

__all__ = [
    "CLEAN_AGREEMENT",
    "DEFAULT_CRITERION",
    "METRICS",
    "STRUCTURE_CUT",
    "SUMMARY_MEASURES",
    "SUMMARY_TARGETS",
    "Criterion",
    "GranulatedKendall",
    "SelectionError",
    "TrialTable",
    "add_selection_metrics",
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
    "paired_validation_band",
    "pareto_front",
    "partial_kendall",
    "pearson_r",
    "per_trial_criteria",
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
