"""Optuna search for Ray Tune that tells early-stopped trials apart from complete ones.

Ray's ``OptunaSearch`` tells Optuna COMPLETE with the low-rung value when ASHA stops a trial, so
TPE mixes 1-epoch and full-budget scores as if they were equal. Here a
trial whose last result is before the final epoch is told PRUNED; its intermediate values were
already reported. Each config also carries the trial's number (``_trial_index``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from trainables.metrics import TRIAL_INDEX_KEY

__all__ = ["FidelityAwareOptunaSearch"]

log = logging.getLogger(__name__)


class FidelityAwareOptunaSearch(OptunaSearch):
    """Also numbers the trials: every config carries its Optuna trial number (0, 1, …) under
    ``_trial_index``, which the trainable reads to run the diagnostics on every N-th trial."""

    def __init__(self, *args: Any, max_epochs: int, metric_names: list[str] | None = None, **kwargs: Any) -> None:
        self._metric_names = metric_names  # before super(), which sets the study up
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs

    def _setup_study(self, mode: str | list[str]) -> None:
        """Ray's study, with the objectives named (optuna-dashboard shows these names)."""
        super()._setup_study(mode)
        if self._metric_names and self._ot_study is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(self._metric_names)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict) and trial_id in self._ot_trials:
            config = {**config, TRIAL_INDEX_KEY: self._ot_trials[trial_id].number}
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """As Ray's, except for a trial the sweep's persistent study has already closed: after a
        killed driver, Ray restores this searcher from its last save, older than the study, and
        re-runs epochs of trials that had finished since. Their first values stay (the same seeds
        recompute the same numbers)."""
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            log.debug("trial %s is already finished in the study; its replayed epoch is not reported", trial_id)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        stopped_early = result is not None and not error and result.get("epoch", self._max_epochs) < self._max_epochs
        if not stopped_early or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        try:
            assert self._ot_study is not None  # set up by OptunaSearch before any trial
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as exc:  # the study refuses a second tell; never crash the driver for it
            log.warning("could not tell Optuna that trial %s was pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
