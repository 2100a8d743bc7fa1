"""Driver-side Ray Tune callbacks: MLflow tracking and a one-line-per-trial progress display."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from trainables.metrics import RAY_KEYS, RECOVERY_KEY, TAG_RESULTS, TEXT_RESULTS, TRIAL_INDEX_KEY
from tuning import selection
from tuning.outbox import Outbox, current_outbox, open_outbox
from tuning.tracking import finish_orphans, log_metrics

__all__ = ["ProgressCallback", "TrackingCallback", "close_sweep", "finals_from"]


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if k not in RAY_KEYS and isinstance(v, int | float)}


def _per_process_state() -> dict[str, Any]:
    """A tracker's state that a driver process rebuilds for itself (not pickled with Tune's):
    the trials whose run it has asked to open, each trial's node and GPU tags as last sent, the
    final metrics of finished trials (read from the outbox when first needed), and whether it has
    ended the runs a resumed sweep no longer knows."""
    return {"_opened": set(), "_where": {}, "_finals": None, "_checked_lost": False}


class TrackingCallback(Callback):
    """One MLflow child run per trial under the sweep's parent run; live sweep statistics.

    Nothing here waits for the store: every write goes to the sweep's outbox
    (:mod:`tuning.outbox`), whose thread delivers it in order, once, and keeps it on disk while
    the store does not answer. Child runs are found by their trial-id tag, so a restored or
    retried trial reopens its run. A driver killed between logging an epoch and saving Tune's
    experiment state restores the trial from an older checkpoint, and the trial reports those
    epochs again: they are logged once, with their first values (a replay with the same seeds
    recomputes the same numbers), and the run's tag ``hesstune.replayed_epochs`` says which
    epochs were re-run. A trial that started after the last save is unknown to the restored
    sweep: its run ends KILLED with the tag ``hesstune.lost``, and the searcher proposes another
    trial in its place. After each finished trial the parent run gets the correlation and regret
    statistics of :func:`tuning.selection.summary` over all finished trials (step = number
    finished).
    """

    objectives = ""  # for trackers pickled by sweeps of older versions
    folder = ""
    _opened: set[str]  # these four: _per_process_state
    _where: dict[str, dict[str, str]]
    _finals: dict[str, dict[str, Any]] | None
    _checked_lost: bool

    def __init__(
        self, uri: str, exp_id: str, parent_id: str, *, sweep: str, folder: Path, objectives: str = ""
    ) -> None:
        self.uri, self.exp_id, self.parent_id = uri, exp_id, parent_id
        self.sweep, self.folder = sweep, str(folder)  # folder: the sweep's, where its outbox lives
        self.objectives = objectives  # the search objective; several (a,b): the parent gets the Pareto front
        self.__dict__.update(_per_process_state())

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **_per_process_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({**_per_process_state(), **state})

    @property
    def outbox(self) -> Outbox:
        if self.folder:
            return open_outbox(Path(self.folder), self.uri, self.exp_id, self.parent_id)
        box = current_outbox()  # a tracker pickled by an older version: the outbox run_sweep opened
        if box is None:
            raise RuntimeError("no tracking outbox is open for this sweep")
        return box

    def _open(self, trial: Any) -> None:
        if trial.trial_id in self._opened:
            return
        self._opened.add(trial.trial_id)
        params = {k: v for k, v in trial.config.items() if not str(k).startswith("_")}
        index = trial.config.get(TRIAL_INDEX_KEY)  # the searcher's trial number (diagnostics schedule)
        tags = {"hesstune.trial_index": str(index)} if index is not None else {}
        self.outbox.put("open", trial=trial.trial_id, name=f"{self.sweep}-{trial.trial_id}", params=params, tags=tags)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if not self._checked_lost:  # once per driver process, when a resumed sweep's trials are restored
            self._checked_lost = True
            self.outbox.put("end_lost", known=sorted(t.trial_id for t in trials))

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        self._open(trial)
        metrics = _metrics(result)
        epoch = int(metrics.get("epoch", 0))
        box, tid = self.outbox, trial.trial_id
        box.put("metrics", trial=tid, step=epoch, ts=_now_ms(), values=_finite_values(metrics))
        # where it runs, tagged again when that changes (a trial retried on another node moves)
        where = {f"hesstune.{k}": result[k] for k in ("node_id", "gpu_ids") if isinstance(result.get(k), str)}
        tags = dict(where) if self._where.get(tid) != where else {}
        self._where[tid] = where
        if isinstance(result.get(RECOVERY_KEY), str):  # the trial resumed past a damaged checkpoint
            tags[f"hesstune.{RECOVERY_KEY}"] = result[RECOVERY_KEY]
        if metrics.get("final"):
            texts = {k: result[k] for k in TEXT_RESULTS if isinstance(result.get(k), str)}
            box.put("texts", trial=tid, texts=texts)  # before the final tag, so a final trial always has them
            tags.update({f"hesstune.{k}": result[k] for k in TAG_RESULTS if isinstance(result.get(k), str)})
            tags["hesstune.final"] = "1"
            self._finished()[tid] = {"trial_id": tid, **metrics, **texts}
        if tags:
            box.put("tags", trial=tid, tags=tags)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open(trial)
        last = trial.last_result or {}
        self.outbox.put("end", trial=trial.trial_id, status="FINISHED" if last.get("final") else "KILLED")
        self.update_summary()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open(trial)
        self.outbox.put("tags", trial=trial.trial_id, tags={"hesstune.error": _error_text(trial)})
        self.outbox.put("end", trial=trial.trial_id, status="FAILED")

    # -- sweep level ----------------------------------------------------------------------------
    def _finished(self) -> dict[str, dict[str, Any]]:
        """Final metrics of the finished trials, kept in memory: this runs in Tune's driver loop,
        so it must not query the store. Read once per driver process from the outbox, which
        holds every write of the sweep (a resumed sweep's earlier trials among them)."""
        if self._finals is None:
            self._finals = finals_from(self.outbox.records())
        return self._finals

    def update_summary(self) -> None:
        import pandas as pd

        table = pd.DataFrame(list(self._finished().values()))
        if not table.empty:
            values = _finite_values(selection.summary(table))
            self.outbox.put("metrics", trial=None, step=len(table), ts=_now_ms(), values=values)

    def finish(self, *, wall_s: float) -> None:
        """Queue the sweep's close (:func:`close_sweep`): delivered after every write before it."""
        self.outbox.put("finish", wall_s=wall_s, objectives=self.objectives)


def finals_from(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The final metrics and texts of each finished trial, from a sweep's outbox records."""
    finals: dict[str, dict[str, Any]] = {}
    texts: dict[str, dict[str, str]] = {}
    for op in records:
        trial = op.get("trial")
        if op["op"] == "metrics" and trial is not None and op["values"].get("final"):
            finals[trial] = {"trial_id": trial, **op["values"]}
        elif op["op"] == "texts":
            texts[str(trial)] = op["texts"]
    return {t: {**row, **texts.get(t, {})} for t, row in finals.items()}


def close_sweep(mc: Any, uri: str, exp_id: str, parent_id: str, *, objectives: str, metrics: dict[str, float]) -> None:
    """End the sweep in the store: close orphan runs, log the final statistics (from the finished
    trials as MLflow has them), ``metrics`` and the artifacts, end the parent run."""
    from tuning.report import finished_trials, write_artifacts

    finish_orphans(mc, exp_id, parent_id, status="KILLED")
    table = finished_trials(uri, exp_id, parent_id)
    if not table.empty:
        log_metrics(mc, parent_id, selection.summary(table), step=len(table))
    log_metrics(mc, parent_id, metrics, step=0)
    if not table.empty:
        criterion = selection.recommended_criterion(table)
        mc.set_tag(parent_id, "hesstune.selection", criterion)
        with tempfile.TemporaryDirectory() as folder:
            write_artifacts(table, Path(folder), criterion=criterion, objective=objectives)
            mc.log_artifacts(parent_id, folder)
    mc.set_terminated(parent_id, status="FINISHED")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (what MLflow logs; JSON has no NaN)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


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
