"""Driver-side Ray Tune callbacks: MLflow tracking and a one-line-per-trial progress display."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from trainables.metrics import RAY_KEYS, RECOVERY_KEY, TAG_RESULTS, TEXT_RESULTS, TRIAL_INDEX_KEY
from tuning import selection
from tuning.tracking import (
    client,
    end_lost_trials,
    finish_orphans,
    log_metrics,
    logged_epochs,
    open_child,
    set_text_tags,
)

__all__ = ["ProgressCallback", "TrackingCallback"]


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if k not in RAY_KEYS and isinstance(v, int | float)}


class TrackingCallback(Callback):
    """One MLflow child run per trial under the sweep's parent run; live sweep statistics.

    Child runs are found by their trial-id tag, so a restored or retried trial reopens its run.
    A driver killed between logging an epoch and saving Tune's experiment state restores the
    trial from an older checkpoint, and the trial reports those epochs again: they are logged
    once, with their first values (a replay with the same seeds recomputes the same numbers),
    and the run's tag ``hesstune.replayed_epochs`` says which epochs were re-run. A trial that
    started after the last save is unknown to the restored sweep: its run ends KILLED with the
    tag ``hesstune.lost``, and the searcher proposes another trial in its place.
    After each finished trial the parent run gets the correlation and regret statistics of
    :func:`tuning.selection.summary` over all finished trials (step = number finished).
    """

    objectives = ""  # for trackers pickled by sweeps of older versions

    def __init__(self, uri: str, exp_id: str, parent_id: str, *, sweep: str, objectives: str = "") -> None:
        self.uri, self.exp_id, self.parent_id = uri, exp_id, parent_id
        self.sweep = sweep
        self.objectives = objectives  # the search objective; several (a,b): the parent gets the Pareto front
        self.children: dict[str, str] = {}
        self.logged: dict[str, int] = {}  # trial id -> last epoch in its MLflow run
        self._client: Any = None
        self._finals: dict[str, dict[str, float]] | None = None  # final metrics of finished trials
        self._checked_lost = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_finals": None, "logged": {}, "_checked_lost": False}

    @property
    def mc(self) -> Any:
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _child(self, trial: Any) -> str:
        if trial.trial_id not in self.children:
            params = {k: v for k, v in trial.config.items() if not str(k).startswith("_")}
            index = trial.config.get(TRIAL_INDEX_KEY)  # the searcher's trial number (diagnostics schedule)
            self.children[trial.trial_id] = open_child(
                self.mc,
                self.exp_id,
                self.parent_id,
                trial.trial_id,
                f"{self.sweep}-{trial.trial_id}",
                params,
                tags={"hesstune.trial_index": str(index)} if index is not None else None,
            )
        if trial.trial_id not in self.logged:  # once per driver process: the store knows, a pickle may be stale
            self.logged[trial.trial_id] = logged_epochs(self.mc, self.children[trial.trial_id])
        return self.children[trial.trial_id]

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if not self._checked_lost:  # once per driver process, when a resumed sweep's trials are restored
            self._checked_lost = True
            end_lost_trials(self.mc, self.exp_id, self.parent_id, {t.trial_id for t in trials})

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._child(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        metrics = _metrics(result)
        run_id = self._child(trial)
        epoch = int(metrics.get("epoch", 0))
        if epoch > self.logged[trial.trial_id]:
            log_metrics(self.mc, run_id, metrics, step=epoch, trial=True)
            self.logged[trial.trial_id] = epoch
        else:
            self._replayed(run_id, epoch)
        for key in ("node_id", "gpu_ids"):
            if isinstance(result.get(key), str) and metrics.get("epoch") == 1:
                self.mc.set_tag(run_id, f"hesstune.{key}", result[key])
        if isinstance(result.get(RECOVERY_KEY), str):  # the trial resumed past a damaged checkpoint
            self.mc.set_tag(run_id, f"hesstune.{RECOVERY_KEY}", result[RECOVERY_KEY])
        if metrics.get("final"):
            texts = {k: result[k] for k in TEXT_RESULTS if isinstance(result.get(k), str)}
            for key, text in texts.items():  # before the final tag, so a final trial always has them
                set_text_tags(self.mc, run_id, key, text)
            for key in TAG_RESULTS:
                if isinstance(result.get(key), str):
                    self.mc.set_tag(run_id, f"hesstune.{key}", result[key])
            self.mc.set_tag(run_id, "hesstune.final", "1")
            self._finished()[trial.trial_id] = {"trial_id": trial.trial_id, **metrics, **texts}

    def _replayed(self, run_id: str, epoch: int) -> None:
        tags = self.mc.get_run(run_id).data.tags
        epochs = [int(e) for e in tags.get("hesstune.replayed_epochs", "").split(",") if e]
        if epoch not in epochs:
            self.mc.set_tag(run_id, "hesstune.replayed_epochs", ",".join(map(str, sorted([*epochs, epoch]))))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run_id = self._child(trial)
        last = trial.last_result or {}
        self.mc.set_terminated(run_id, status="FINISHED" if last.get("final") else "KILLED")
        self.update_summary()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run_id = self._child(trial)
        self.mc.set_tag(run_id, "hesstune.error", _error_text(trial))
        self.mc.set_terminated(run_id, status="FAILED")

    # -- sweep level ----------------------------------------------------------------------------
    def _finished(self) -> dict[str, dict[str, float]]:
        """Final metrics of the finished trials, kept in memory: this runs in Tune's driver loop,
        so it must not query the store after every trial. Read from MLflow once per driver
        process (a resumed sweep's earlier trials) and again, authoritatively, in ``finish``."""
        if self._finals is None:
            from tuning.report import finished_trials

            table = finished_trials(self.uri, self.exp_id, self.parent_id).drop(
                columns=["params", "run_id"], errors="ignore"
            )
            self._finals = {row["trial_id"]: row for row in table.to_dict("records")}
        return self._finals

    def update_summary(self, table: Any = None) -> dict[str, float]:
        import pandas as pd

        table = pd.DataFrame(list(self._finished().values())) if table is None else table
        if table.empty:
            return {}
        stats = selection.summary(table)
        log_metrics(self.mc, self.parent_id, stats, step=len(table))
        return stats

    def finish(self, *, wall_s: float) -> dict[str, float]:
        """Close orphans, log the final statistics and artifacts, end the parent run."""
        from tuning.report import finished_trials, write_artifacts

        finish_orphans(self.mc, self.exp_id, self.parent_id, status="KILLED")
        table = finished_trials(self.uri, self.exp_id, self.parent_id)
        stats = self.update_summary(table)
        log_metrics(self.mc, self.parent_id, {"sweep_wall_s": wall_s}, step=0)
        if not table.empty:
            criterion = selection.recommended_criterion(table)
            self.mc.set_tag(self.parent_id, "hesstune.selection", criterion)
            with tempfile.TemporaryDirectory() as folder:
                write_artifacts(table, Path(folder), criterion=criterion, objective=self.objectives)
                self.mc.log_artifacts(self.parent_id, folder)
        self.mc.set_terminated(self.parent_id, status="FINISHED")
        return stats


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:4000]


class ProgressCallback(Callback):
    """Prints one line when a trial finishes or fails: ``[3/16] trial … bound 0.91 …``, and
    while trials run, at most every ``heartbeat_s``, which epoch each running trial has reached."""

    epochs_total, heartbeat_s, offset = 0, 60.0, 0  # for callbacks pickled by sweeps of older versions

    def __init__(
        self,
        total: int,
        metric: str,
        *,
        epochs: int = 0,
        heartbeat_s: float = 60.0,
        offset: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:
        """``total`` trials in this Ray run; ``offset`` trials in the sweep's earlier runs (an
        extension counts on from them)."""
        self.total, self.metric, self.log, self.offset = total, metric, log, offset
        self.epochs_total, self.heartbeat_s = epochs, heartbeat_s
        self.setup()

    def setup(
        self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any
    ) -> None:
        self.started = self.last_line = time.time()  # also after a restore, which unpickles this callback
        self.epoch: dict[str, int] = {}

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        self.epoch[trial.trial_id] = int(result.get("epoch", 0))
        if time.time() - self.last_line < self.heartbeat_s:
            return
        of = f"/{self.epochs_total}" if self.epochs_total else ""
        running = [f"{t.trial_id} epoch {self.epoch.get(t.trial_id, 0)}{of}" for t in trials if t.status == "RUNNING"]
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        self._line(f"  running: {', '.join(running)}; {self.offset + done}/{self.offset + self.total} done")

    def _line(self, text: str) -> None:
        self.log(f"{text} ({time.time() - self.started:.0f} s elapsed)")
        self.last_line = time.time()

    def _count(self, trials: list[Any], current: Any) -> str:
        """``done/total`` in the sweep, this trial included (its status is not final yet when Ray
        calls us)."""
        done = sum(t is current or t.status in ("TERMINATED", "ERROR") for t in trials)
        return f"{self.offset + done}/{self.offset + self.total}"

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        parts = [
            f"{k} {r[k]:.4g}"
            for k in dict.fromkeys((self.metric, "measure", "val_acc", "test_acc", "gap"))
            if _finite(r.get(k))
        ]
        state = "" if r.get("final") else " (stopped early)"
        self._line(f"[{self._count(trials, trial)}] {trial.trial_id}{state}: {', '.join(parts)}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._line(f"[{self._count(trials, trial)}] {trial.trial_id} FAILED: {_error_text(trial)}")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
