"""The Ray Tune function trainable: a thin adapter around :func:`trainables.loop.fine_tune`.

It turns the flat trial config into a :class:`RunConfig` once, resumes from the trial's last
checkpoint when Ray restarts it, and reports once per epoch (``ray.tune.report``, never
``ray.train.report``, which raises inside Tune in Ray 2.60) with a checkpoint. Ray is imported
inside the function only, so importing :mod:`trainables` starts nothing.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainables.config import RunConfig
from trainables.loop import fine_tune
from trainables.metrics import OBJECTIVE_KEY, TRIAL_INDEX_KEY

__all__ = ["STATE_FILE", "TrialOutOfMemoryError", "run_trial"]

STATE_FILE = "state.pt"


def _load_checkpoint() -> dict[str, Any] | None:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def _fault_injection(epoch: int) -> None:
    """Test hook for the fault-tolerance tests: ``HESSTUNE_FAULT=raise-once@E`` makes every trial
    fail once after epoch E's report (a marker per trial in ``HESSTUNE_FAULT_DIR`` remembers it),
    so the retry must resume from that epoch's checkpoint."""
    fault = os.environ.get("HESSTUNE_FAULT", "")
    if fault != f"raise-once@{epoch}":
        return
    from ray import tune

    marker = (
        Path(os.environ.get("HESSTUNE_FAULT_DIR", tempfile.gettempdir())) / f"fault-{tune.get_context().get_trial_id()}"
    )
    if not marker.exists():
        marker.write_text("raised")
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
    config: dict[str, Any], *, objective: str = "bound", gpu_fraction: float = 0.0, diagnostics_every: int = 1
) -> None:
    """Ray Tune function trainable for one fine-tuning trial (threads come from the config).

    ``diagnostics_every`` N: trace and λ_max only when the trial's number (``_trial_index``, set
    by the sweep's searcher; 0 when absent) is a multiple of N; M and B always."""
    try:
        _run(config, objective, gpu_fraction, diagnostics_every)
    except torch.cuda.OutOfMemoryError as exc:
        raise TrialOutOfMemoryError(
            f"CUDA out of memory with {gpu_fraction or 1} GPU per trial ({str(exc).splitlines()[0]}): "
            "raise --gpus-per-trial or lower optim.batch_size"
        ) from exc


def _run(config: dict[str, Any], objective: str, gpu_fraction: float, diagnostics_every: int) -> None:
    from ray import tune

    cfg = RunConfig.from_flat({k: v for k, v in config.items() if not k.startswith("_")})
    if int(config.get(TRIAL_INDEX_KEY, 0)) % diagnostics_every:
        cfg = cfg.replace(**{"measure.trace": False, "measure.eigenvalue": False})
    where = _placement(gpu_fraction)
    resume = _load_checkpoint()
    for result in fine_tune(cfg, resume=resume, log=lambda msg: print(msg, flush=True)):
        metrics: dict[str, Any] = {**result.metrics, **result.records, **where}
        metrics[OBJECTIVE_KEY] = float(metrics.get(objective, math.nan))
        metrics["final"] = 1.0 if result.final else 0.0
        with tempfile.TemporaryDirectory() as folder:
            torch.save(result.state(), Path(folder) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        _fault_injection(result.epoch)
