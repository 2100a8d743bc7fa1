"""The Ray Tune function trainable: a thin adapter around :func:`trainables.loop.fine_tune`.

It turns the flat trial config into a :class:`RunConfig` once, resumes from the trial's last
checkpoint when Ray restarts it, and reports once per epoch (``ray.tune.report``, never
``ray.train.report``, which raises inside Tune in Ray 2.60) with a checkpoint. Ray is imported
inside the function only, so importing :mod:`trainables` starts nothing.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainables.config import RunConfig
from trainables.loop import fine_tune
from trainables.metrics import OBJECTIVE_KEY, RECOVERY_KEY, TRIAL_INDEX_KEY

__all__ = ["CHECKSUM_FILE", "STATE_FILE", "TrialOutOfMemoryError", "read_state", "run_trial", "write_state"]

STATE_FILE = "state.pt"
CHECKSUM_FILE = "state.sha256"


def _load_checkpoint() -> tuple[dict[str, Any] | None, str | None]:
    """The trial's state to resume from, and what recovery it needed (None: none).

    Ray hands over the trial's newest checkpoint. One that is damaged (truncated, unreadable, or
    not matching the checksum written with it) is passed over for the newest intact older one
    in the trial's folder (Ray keeps two); with none left the trial restarts from scratch."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as folder:
        state, problem = read_state(Path(folder))
    if state is not None:
        return state, None
    newest = Path(checkpoint.path)
    older = sorted((p for p in newest.parent.glob("checkpoint_*") if p.name < newest.name), reverse=True)
    for candidate in older:
        state, _ = read_state(candidate)
        if state is not None:
            return state, f"{newest.name} {problem}: resumed from {candidate.name} (epoch {state.get('epoch')})"
    return None, f"{newest.name} {problem}, and no older intact checkpoint: restarted from scratch"


def write_state(state: dict[str, Any], folder: Path) -> None:
    """``state.pt`` and its SHA-256 (``state.sha256``), each written whole then renamed into place,
    so a reader sees a complete file or none."""
    tmp = folder / f"{STATE_FILE}.tmp"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, folder / STATE_FILE)
    (folder / f"{CHECKSUM_FILE}.tmp").write_text(digest + "\n")
    os.replace(folder / f"{CHECKSUM_FILE}.tmp", folder / CHECKSUM_FILE)


def read_state(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint's state if intact, else None and what is wrong with it. A checkpoint written
    before checksums existed is read as it is."""
    path = folder / STATE_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    checksum = folder / CHECKSUM_FILE
    if checksum.exists() and hashlib.sha256(data).hexdigest() != checksum.read_text().strip():
        return None, f"damaged ({STATE_FILE} does not match its checksum)"
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), ""
    except Exception as exc:  # a truncated or foreign file: torch raises several kinds
        return None, f"unreadable ({type(exc).__name__})"


def _fault_injection(epoch: int) -> None:
    """Test hook for the fault-tolerance tests: ``HESSTUNE_FAULT=raise-once@E`` makes every trial
    fail once after epoch E's report (a marker per trial in ``HESSTUNE_FAULT_DIR`` remembers it),
    so the retry must resume from that epoch's checkpoint; ``corrupt-once@E`` also truncates that
    checkpoint first (found below ``HESSTUNE_FAULT_DIR``, which must hold the sweep's --output),
    so the retry must detect it and fall back to the one before. ``slow@S`` sleeps S seconds after
    every epoch: trials that last long while using little CPU (the tracking-outage test)."""
    fault = os.environ.get("HESSTUNE_FAULT", "")
    if fault.startswith("slow@"):
        time.sleep(float(fault.removeprefix("slow@")))
        return
    if fault not in (f"raise-once@{epoch}", f"corrupt-once@{epoch}"):
        return
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    faults = Path(os.environ.get("HESSTUNE_FAULT_DIR", tempfile.gettempdir()))
    marker = faults / f"fault-{trial_id}"
    if marker.exists():
        return
    marker.write_text("raised")
    if fault.startswith("corrupt"):  # the persisted copy, in the sweep's --output below the fault folder
        newest = max(faults.rglob(f"trial_{trial_id}/checkpoint_*/{STATE_FILE}"))
        newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    raise RuntimeError(f"injected fault after epoch {epoch}")


class TrialOutOfMemoryError(RuntimeError):
    """CUDA ran out of memory in a trial: named as such so that it is not a generic failure."""


def _placement(gpu_fraction: float) -> dict[str, str]:
    """Where the trial runs (node id, GPU ids); caps this process's share of a shared GPU."""
    import ray

    gpus = [str(g) for g in ray.get_gpu_ids()]
    if gpus and torch.cuda.is_available() and 0 < gpu_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(gpu_fraction)  # Ray's GPU fractions are logical only
    return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ",".join(gpus)}


def run_trial(
    config: dict[str, Any],
    *,
    objective: str = "bound",
    gpu_fraction: float = 0.0,
    diagnostics_every: int = 1,
    searched: tuple[str, ...] = (),
) -> None:
    """Ray Tune function trainable for one fine-tuning trial (threads come from the config).

    ``diagnostics_every`` N: trace and λ_max only when the trial's number (``_trial_index``, set
    by the sweep's searcher; 0 when absent) is a multiple of N; M and B always. ``searched``: the
    metrics a multi-objective searcher reads, in every result (NaN in an epoch that did not
    measure them: Ray refuses results without them; the searcher reads the final one)."""
    try:
        _run(config, objective, gpu_fraction, diagnostics_every, searched)
    except torch.cuda.OutOfMemoryError as exc:
        raise TrialOutOfMemoryError(
            f"CUDA out of memory with {gpu_fraction or 1} GPU per trial ({str(exc).splitlines()[0]}): "
            "raise --gpus-per-trial or lower optim.batch_size"
        ) from exc


def _run(
    config: dict[str, Any], objective: str, gpu_fraction: float, diagnostics_every: int, searched: tuple[str, ...]
) -> None:
    from ray import tune

    cfg = RunConfig.from_flat({k: v for k, v in config.items() if not k.startswith("_")})
    if int(config.get(TRIAL_INDEX_KEY, 0)) % diagnostics_every:
        cfg = cfg.replace(**{"measure.trace": False, "measure.eigenvalue": False})
    where = _placement(gpu_fraction)
    resume, recovery = _load_checkpoint()
    for result in fine_tune(cfg, resume=resume, log=lambda msg: print(msg, flush=True)):
        metrics: dict[str, Any] = {**result.metrics, **result.records, **where}
        metrics[OBJECTIVE_KEY] = float(metrics.get(objective, math.nan))
        for name in searched:
            metrics.setdefault(name, math.nan)
        metrics["final"] = 1.0 if result.final else 0.0
        if recovery:  # once, with the first epoch after it: the driver tags the trial's run
            metrics[RECOVERY_KEY], recovery = recovery, None
        with tempfile.TemporaryDirectory() as folder:
            write_state(result.state(), Path(folder))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        _fault_injection(result.epoch)
