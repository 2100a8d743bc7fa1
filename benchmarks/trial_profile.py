"""Where a trial's time goes: training, evaluation, the Hessian measures, checkpoints.

    uv run python benchmarks/trial_profile.py [--regimes digits,fashion,fashion-resnet10t]
                                              [--configs 4] [--epochs 10] [--threads 1]

Each regime runs ``--configs`` trials in this process, one after another, each with one torch
thread (what a default sweep gives a trial: ``--cpus-per-trial 1``): the base config's own point
first, then configurations drawn at random from the ``full`` space (what TPE's start-up trials
draw; seeded, so every run profiles the same configurations). Per trial and phase:

- ``setup``: model creation (the cached source model), the noise-matrix estimate;
- ``train``: the training epochs (``epoch_s``);
- ``eval``: every epoch's evaluation on train, validation and test (``eval_s``);
- ``M``: the per-sample curvature measure (``measure_s``; B adds one forward pass over S);
- ``trace``, ``lambda_max``: the diagnostics (``trace_s``, ``lambda_max_s``), when they run;
- ``checkpoint``: the per-epoch state copy + ``torch.save`` the Ray trainable does;
- ``other``: the rest of the wall time (regularizer bookkeeping, distances, B's forward pass).

Reporting to Ray and MLflow happens on the driver, beside the trials: ``benchmarks/sweep_overhead.py``
measures it. Every profiled trial runs all measures. ``hessian_share`` is what a sweep spends on
them, over all its trials: Σ (M + d/N) / Σ (wall − d + d/N), d = trace + λ_max seconds, for a sweep
that runs the diagnostics in every N-th trial (``--diagnostics-every N``; every trial's own
measured seconds, weighted by the schedule). It is printed for N = 1 and for the sweep's default N,
whose value the ``hessian_share_*`` lines give. ``measure_over_floor`` = M's time / one plain training epoch over
S (batch 32: forward, backward, Adam step, timed on the trial's final model) / the floor
(1 + L)/3 epochs of an exact per-sample max measure (L = convolution and linear layers;
docs/measures.md §7). Ends with ``hessian_share_digits``, ``hessian_share_fashion`` (the larger of
the Fashion regimes run) and ``measure_over_floor_fashion`` lines.

Regimes: ``digits`` (the default sweep: built-in task, ``test_resnet``, 40 % symmetric noise);
``fashion`` (Fashion-MNIST classes 5–9, 2,000 training and 800 validation images, F estimated,
``test_resnet`` pretrained on classes 0–4); ``fashion-resnet10t`` (the same data on timm
``resnet10t`` at 32 px, 4.9 M parameters, from random init: pretraining it on 30,000 images
takes an hour here, and the cost of a measure does not depend on the weights). The Fashion
regimes need the IDX files (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.loading import load_space
from trainables.config import RunConfig
from trainables.data import TaskData, load_task
from trainables.loop import fine_tune
from trainables.models import ensure_source_model
from trainables.regularizers import enabled_regularizers
from tuning.sweep import DIAGNOSTICS_EVERY

FASHION = {
    "task.name": "fashion-mnist",
    "task.train_size": 2000,
    "task.val_size": 800,
    "task.noise.reveal": False,
}
REGIMES: dict[str, dict[str, Any]] = {
    "digits": {},
    "fashion": FASHION,
    "fashion-resnet10t": {**FASHION, "model.name": "resnet10t", "model.pretrained": "none"},
}
PHASES = ("setup", "train", "eval", "M", "trace", "lambda_max", "checkpoint", "other")
HESSIAN = ("M", "trace", "lambda_max")


def configurations(base: RunConfig, count: int, seed: int = 0) -> list[RunConfig]:
    """The base config's own point, then ``count - 1`` random draws from the ``full`` space."""
    bound = load_space("full").bind(base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = [base]
    for _ in range(count - 1):
        trial = study.ask()
        constants = bound(trial)
        configs.append(RunConfig.from_flat({**constants, **trial.params}))
    return configs


def plain_epoch_s(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 32) -> float:
    """One plain training epoch over (x, y) on a copy of ``model``: the measure's floor unit."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tic = time.perf_counter()
    for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    return time.perf_counter() - tic


def profile(cfg: RunConfig, data: TaskData) -> dict[str, float]:
    """Seconds per phase of one trial, and its M-over-floor ratio."""
    phases = dict.fromkeys(PHASES, 0.0)
    tic = time.perf_counter()
    last = tic
    result = None
    with tempfile.TemporaryDirectory() as folder:
        for result in fine_tune(cfg, data=data, log=lambda _: None):
            start = time.perf_counter()
            torch.save(result.state(), Path(folder) / "state.pt")
            now = time.perf_counter()
            phases["checkpoint"] += now - start
            m = result.metrics
            known = m["epoch_s"] + m.get("eval_s", 0.0)
            known += sum(m.get(key, 0.0) for key in ("measure_s", "trace_s", "lambda_max_s"))
            if result.epoch == 1:
                phases["setup"] = start - last - known  # generator start: model, transition
            else:
                phases["other"] += start - last - known
            phases["train"] += m["epoch_s"]
            phases["eval"] += m.get("eval_s", 0.0)
            last = now
    assert result is not None
    m = result.metrics
    for phase, key in (("M", "measure_s"), ("trace", "trace_s"), ("lambda_max", "lambda_max_s")):
        phases[phase] = m.get(key, 0.0)
    phases["wall"] = time.perf_counter() - tic
    model = _final_model(cfg, data, result.state()["model"])
    n = int(m["measure_samples"])
    epoch = plain_epoch_s(model, data.train.x[:n], data.train.labels[:n])
    layers = sum(isinstance(module, nn.Conv2d | nn.Linear) for module in model.modules())
    phases["measure_over_floor"] = m["measure_s"] / epoch / ((1 + layers) / 3)
    phases["trace_rel_se"] = m.get("trace_se", float("nan")) / abs(m.get("trace", float("nan")))
    return phases


def _final_model(cfg: RunConfig, data: TaskData, state: dict[str, torch.Tensor]) -> nn.Module:
    from trainables.models import create_model

    model = create_model(cfg.model, data.num_classes, task=cfg.task)
    model.load_state_dict(state)
    return model


def run_regime(name: str, count: int, epochs: int, threads: int) -> list[dict[str, float]]:
    base = RunConfig().replace(**REGIMES[name], epochs=epochs, threads=threads)
    data = load_task(base.task)
    if base.model.pretrained == "source":
        ensure_source_model(base.model.name, base.task, log=print)
    rows = []
    for i, cfg in enumerate(configurations(base, count)):
        row = profile(cfg, data)
        rows.append(row)
        on = enabled_regularizers(cfg)
        shares = "  ".join(f"{p} {row[p]:6.2f}" for p in PHASES)
        print(
            f"{name} trial {i}: {row['wall']:7.2f} s  {shares}  hessian {hessian_share([row]):.3f}  "
            f"M/floor {row['measure_over_floor']:.2f}  trace rel.se {row['trace_rel_se']:.3f}  "
            f"methods {','.join(on) or 'none'}",
            flush=True,
        )
    return rows


def hessian_share(rows: list[dict[str, float]], every: int = 1) -> float:
    """Σ Hessian seconds / Σ wall seconds of a sweep running trace and λ_max in every N-th trial."""
    diagnostics = [r["trace"] + r["lambda_max"] for r in rows]
    hessian = sum(r["M"] + d / every for r, d in zip(rows, diagnostics, strict=True))
    wall = sum(r["wall"] - d + d / every for r, d in zip(rows, diagnostics, strict=True))
    return hessian / wall


def summary(name: str, rows: list[dict[str, float]]) -> None:
    wall = statistics.median(r["wall"] for r in rows)
    print(f"\n{name}: median over {len(rows)} trials, seconds and share of the trial's wall time ({wall:.1f} s)")
    for phase in PHASES:
        seconds = statistics.median(r[phase] for r in rows)
        share = statistics.median(r[phase] / r["wall"] for r in rows)
        print(f"  {phase:<12}{seconds:8.2f}{share:8.3f}")
    shares = [hessian_share([r]) for r in rows]
    print(f"  {'Hessian':<12}{'':8}{statistics.median(shares):8.3f}  (per trial: {min(shares):.3f}–{max(shares):.3f})")
    every = DIAGNOSTICS_EVERY
    print(
        f"  sweep share: {hessian_share(rows):.3f} with trace and λ_max in every trial, "
        f"{hessian_share(rows, every):.3f} in every {every}th (--diagnostics-every {every}, the default); "
        f"M alone {hessian_share(rows, 10**9):.3f}"
    )
    fine = [r["trace_rel_se"] for r in rows]
    print(f"  trace standard error / trace: median {statistics.median(fine):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated, from {', '.join(REGIMES)}")
    parser.add_argument("--configs", type=int, default=4, help="trials per regime (the base point + random draws)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial (a sweep's --cpus-per-trial)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = args.regimes.split(",")
    unknown = [n for n in names if n not in REGIMES]
    if unknown:
        parser.error(f"unknown regime(s) {unknown}: use {', '.join(REGIMES)}")
    print(f"torch {torch.__version__}, {args.threads} thread(s) per trial, {args.epochs} epochs, {args.configs} trials")
    results = {name: run_regime(name, args.configs, args.epochs, args.threads) for name in names}
    for name, rows in results.items():
        summary(name, rows)
    if "digits" in results:
        print(f"hessian_share_digits: {hessian_share(results['digits'], DIAGNOSTICS_EVERY):.3f}")
    fashion = [n for n in results if n.startswith("fashion")]
    if fashion:
        share = max(hessian_share(results[n], DIAGNOSTICS_EVERY) for n in fashion)
        floor = max(statistics.median(r["measure_over_floor"] for r in results[n]) for n in fashion)
        print(f"hessian_share_fashion: {share:.3f}")
        print(f"measure_over_floor_fashion: {floor:.3f}")


if __name__ == "__main__":
    main()
