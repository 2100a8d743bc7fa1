"""Tracking that outlives an outage of the MLflow store (docs/design.md, "Tracking outages").

A sweep's driver does not write to MLflow directly. Each write is appended to an outbox file in
the sweep's folder, ``tracking_outbox.jsonl`` (one JSON operation a line), and a background thread
delivers the file in order. While the store does not answer, the thread retries every few
seconds and the trials go on training; once it answers, the backlog goes out, in order. A state
file beside it records how far delivery got, so a driver that is killed, or a sweep that ends
before the store is back, leaves the rest on disk for ``hesstune sweep --resume NAME`` or
``hesstune sync NAME``.

Each write is delivered once. Operations name trials, not MLflow run ids, and resolve them when
delivered (a trial's run is found by its tag, or created), so they do not depend on the store's
answers at the time they were queued. Tags, statuses and the opening of a run can be repeated
harmlessly. Metric points cannot, so two cases are checked:
- the one write that may or may not have reached the store when delivery stopped (the driver was
  killed, or the connection dropped mid-request): it is looked up by its step and timestamp;
- an epoch a trial reports a second time (it was restored from an older checkpoint): it is
  skipped and recorded in the run's tag ``hesstune.replayed_epochs``.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuning.tracking import (
    TrackingError,
    client,
    end_lost_trials,
    find_child,
    log_metrics,
    logged_epochs,
    logged_key,
    open_child,
    set_text_tags,
)

__all__ = ["OUTBOX", "Outbox", "TrackingBehind", "current_outbox", "open_outbox", "undelivered"]

OUTBOX = "tracking_outbox.jsonl"
STATE = "tracking_outbox.state.json"
REJECTED = "tracking_outbox.rejected.jsonl"
LOCK = "tracking_outbox.lock"
MAX_PENDING_BYTES = 256 * 2**20  # undelivered writes kept on disk before a sweep stops (a typical sweep: < 5 MB)
RETRY_S = 5.0

# MLflow error codes that no retry can fix: the write is wrong, not the connection
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"}


class TrackingBehind(TrackingError):
    """The store has been unreachable for so long that the outbox reached its bound."""


def _permanent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


class Outbox:
    """The on-disk queue of one sweep's MLflow writes and the thread that delivers it.

    ``put`` appends an operation and returns at once; ``wait`` blocks until everything queued is
    delivered or a timeout passes. Use :func:`open_outbox`: one instance per sweep folder and
    process, shared by every tracker of the sweep (a restored Tune run brings its own)."""

    def __init__(
        self,
        folder: Path,
        uri: str,
        exp_id: str,
        parent_id: str,
        *,
        log: Callable[[str], None] = print,
        retry_s: float = RETRY_S,
        max_pending: int = MAX_PENDING_BYTES,
        make_client: Callable[[str], Any] = client,
    ) -> None:
        self.path, self.state_path = folder / OUTBOX, folder / STATE
        self.uri, self.exp_id, self.parent_id = uri, exp_id, parent_id
        self.log, self.retry_s, self.max_pending = log, retry_s, max_pending
        self._make_client, self._mc = make_client, None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / LOCK, "a")  # noqa: SIM115 (held as long as the outbox)
        try:  # one process delivers a sweep's outbox: a running driver, or `hesstune sync`
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TrackingError(
                f"another process (a running sweep, or `hesstune sync`) is sending {self.path}: let it finish"
            ) from None
        self.path.touch()
        self._size = _complete_size(self.path)
        with open(self.path, "r+b") as fh:  # a line cut by a kill mid-write was never queued
            fh.truncate(self._size)
        self._writer = open(self.path, "ab")  # noqa: SIM115 (lives as long as the outbox)
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.offset = min(int(state.get("offset", 0)), self._size)
        self.behind_s = float(state.get("behind_s", 0.0))  # time spent behind, all outages so far
        self.outages = int(state.get("outages", 0))
        self.late = int(state.get("late", 0))  # writes delivered after an outage began
        self.behind_since: float | None = None  # wall time of the failure that began the current outage
        self._in_doubt = True  # the first write after a start or a failure may have landed already
        self._runs: dict[str | None, str] = {None: parent_id}  # trial id -> MLflow run id
        self._epochs: dict[str, int] = {}  # trial id -> last epoch in its run

    # -- queueing (the driver's thread) ------------------------------------------------------------
    def put(self, op: str, **fields: Any) -> None:
        """Queue one write: ``op`` names it, ``fields`` are its JSON-serialisable arguments."""
        line = (json.dumps({"op": op, **fields}, allow_nan=False, default=str) + "\n").encode()
        with self._cond:
            if self._size + len(line) - self.offset > self.max_pending:
                raise TrackingBehind(
                    f"the tracking store {self.uri} has not answered for {_duration(self.behind_for())} and "
                    f"{(self._size - self.offset) / 2**20:.0f} MiB of writes are waiting in {self.path}: the sweep "
                    "stops here, its trials are checkpointed; once the store answers, "
                    f"`hesstune sweep --resume {self.path.parent.name}` delivers them and goes on"
                )
            self._writer.write(line)
            self._writer.flush()
            self._size += len(line)
            self._cond.notify_all()
        self._start()

    def pending_writes(self) -> int:
        """Writes queued and not yet delivered."""
        return _lines_after(self.path, self.offset)

    def wait(self, timeout: float) -> bool:
        """Block until every queued write is delivered (True) or ``timeout`` seconds pass (False)."""
        self._start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.offset < self._size:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def records(self) -> Iterator[dict[str, Any]]:
        """Every operation ever queued in this sweep's outbox, delivered or not, oldest first."""
        with open(self.path, "rb") as fh:
            for line in fh.read(self._size).splitlines():
                yield json.loads(line)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._writer.close()
        self._lock.close()  # releases the lock
        _OPEN.pop(self.path, None)

    def behind_for(self) -> float:
        """Seconds since the current outage began (0 when tracking is not behind)."""
        return time.time() - self.behind_since if self.behind_since is not None else 0.0

    # -- delivery (the outbox's thread) ------------------------------------------------------------
    def _start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._deliver_all, name="hesstune-outbox", daemon=True)
                self._thread.start()

    def _deliver_all(self) -> None:
        with open(self.path, "rb") as reader:
            while True:
                with self._cond:
                    while self.offset >= self._size and not self._closed:
                        self._cond.wait()
                    if self.offset >= self._size:
                        return
                reader.seek(self.offset)
                line = reader.readline()
                try:
                    self._deliver(json.loads(line))
                except Exception as exc:  # the store is down, or refused this write
                    if not _permanent(exc):
                        self._failed(exc)
                        with self._cond:
                            if self._cond.wait_for(lambda: self._closed, timeout=self.retry_s):
                                return
                        continue
                    self._reject(line, exc)
                self._advance(len(line))

    def _failed(self, exc: Exception) -> None:
        self._in_doubt, self._mc = True, None  # a fresh client: MLflow caches sessions per host
        if self.behind_since is None:
            self.behind_since = time.time()
            self.outages += 1
            before, _, after = " ".join(str(exc).split()).partition(" failed with exception ")
            reason = (after or before)[:160]
            self.log(
                f"tracking: {self.uri} does not answer ({reason}); trials go on, their writes wait in {self.path} "
                f"and are sent when it answers"
            )

    def _reject(self, line: bytes, exc: Exception) -> None:
        with open(self.path.with_name(REJECTED), "ab") as fh:
            fh.write(line)
        self.log(f"tracking: the store refused a write ({' '.join(str(exc).split())[:300]}); kept in {REJECTED}")

    def _advance(self, n: int) -> None:
        with self._cond:
            self.offset += n
            self._in_doubt = False
            if self.behind_since is not None:
                self.late += 1
                if self.offset >= self._size:  # caught up
                    behind = self.behind_for()
                    self.behind_s += behind
                    self.behind_since = None
                    self.log(f"tracking: caught up after {_duration(behind)} behind; {self.late} writes sent late")
            self._save_state()
            self._cond.notify_all()

    def _save_state(self) -> None:
        state = {"offset": self.offset, "behind_s": self.behind_s, "outages": self.outages, "late": self.late}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_path)  # atomic: a kill leaves the old state or the new one

    @property
    def mc(self) -> Any:
        if self._mc is None:
            self._mc = self._make_client(self.uri)
        return self._mc

    def _run(self, trial: str | None) -> str:
        if trial not in self._runs:
            run_id = find_child(self.mc, self.exp_id, self.parent_id, str(trial))
            if run_id is None:
                raise TrackingError(f"no MLflow run for trial {trial}: its opening write is missing")
            self._runs[trial] = run_id
        return self._runs[trial]

    def _deliver(self, op: dict[str, Any]) -> None:
        kind, trial = op["op"], op.get("trial")
        if kind == "open":
            run_id = open_child(self.mc, self.exp_id, self.parent_id, str(trial), op["name"], op["params"], op["tags"])
            self._runs[trial] = run_id
        elif kind == "metrics":
            self._metrics(op)
        elif kind == "tags":
            from mlflow.entities import RunTag

            self.mc.log_batch(self._run(trial), tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
        elif kind == "texts":
            for name, text in op["texts"].items():
                set_text_tags(self.mc, self._run(trial), name, text)
        elif kind == "end":
            self.mc.set_terminated(self._run(trial), status=op["status"])
        elif kind == "end_lost":
            end_lost_trials(self.mc, self.exp_id, self.parent_id, set(op["known"]))
        elif kind == "finish":
            from tuning.callbacks import close_sweep

            extra = {"tracking_behind_s": self.behind_s + self.behind_for(), "tracking_outages": self.outages}
            metrics = {"sweep_wall_s": op["wall_s"], **extra}
            close_sweep(self.mc, self.uri, self.exp_id, self.parent_id, objectives=op["objectives"], metrics=metrics)
        else:
            raise TrackingError(f"unknown outbox operation {kind!r}")

    def _metrics(self, op: dict[str, Any]) -> None:
        trial, step = op.get("trial"), int(op["step"])
        run_id = self._run(trial)
        values: dict[str, float] = op["values"]
        if self._in_doubt and self._landed(run_id, values, step, op["ts"], trial is not None):
            if trial is not None:
                self._epochs[trial] = max(self._epochs.get(trial, 0), step)
            return
        if trial is not None:
            if trial not in self._epochs:
                self._epochs[trial] = logged_epochs(self.mc, run_id)
            if step <= self._epochs[trial]:  # the trial reported this epoch again: the first values stay
                self._replayed(run_id, step)
                return
        log_metrics(self.mc, run_id, values, step, trial=trial is not None, timestamp=op["ts"])
        if trial is not None:
            self._epochs[trial] = step

    def _landed(self, run_id: str, values: dict[str, float], step: int, ts: int, trial: bool) -> bool:
        """Whether this batch of metric points is in the store already (any of its points is: a
        batch is written in one transaction). Queued values are finite: JSON holds no NaN."""
        key = next(iter(values), None)
        if key is None:
            return True  # nothing to log
        history = self.mc.get_metric_history(run_id, logged_key(key, trial=trial))
        return any(m.step == step and m.timestamp == ts for m in history)

    def _replayed(self, run_id: str, epoch: int) -> None:
        tags = self.mc.get_run(run_id).data.tags
        epochs = [int(e) for e in tags.get("hesstune.replayed_epochs", "").split(",") if e]
        if epoch not in epochs:
            self.mc.set_tag(run_id, "hesstune.replayed_epochs", ",".join(map(str, sorted([*epochs, epoch]))))


def _complete_size(path: Path) -> int:
    """Bytes of ``path`` up to and including its last newline."""
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


def undelivered(folder: Path) -> int:
    """Writes in the outbox of the sweep in ``folder`` that its store has not had yet (read
    without opening it: a running sweep may be delivering them)."""
    path = folder / OUTBOX
    if not path.exists():
        return 0
    state = json.loads((folder / STATE).read_text()) if (folder / STATE).exists() else {}
    return _lines_after(path, int(state.get("offset", 0)))


def _lines_after(path: Path, offset: int) -> int:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read().count(b"\n")


_OPEN: dict[Path, Outbox] = {}


def open_outbox(folder: Path, uri: str, exp_id: str, parent_id: str, **kwargs: Any) -> Outbox:
    """The outbox of the sweep in ``folder``, opened once per process (later calls share it)."""
    path = (folder / OUTBOX).resolve()
    if path not in _OPEN:
        _OPEN[path] = Outbox(folder.resolve(), uri, exp_id, parent_id, **kwargs)
    return _OPEN[path]


def current_outbox() -> Outbox | None:
    """The one outbox this process has open (for a tracker pickled without a folder), if exactly one."""
    return next(iter(_OPEN.values())) if len(_OPEN) == 1 else None
