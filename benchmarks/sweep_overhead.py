"""How much a sweep costs beyond its trials' own work (Ray Tune + Optuna + MLflow on the driver).

    uv run python benchmarks/sweep_overhead.py [--trials 8] [--epochs 25] [--short-trials 24]

Two sweeps, measured in one run, both with actor reuse and a local sqlite MLflow store:
- "long": trials of ≥ 30 s (digits, ``--epochs`` epochs, measures on) → overhead fraction;
- "short": tiny trials (32 samples, 1 epoch, no measures) → seconds of overhead per trial.

own time of a trial = Ray's ``time_total_s`` (everything inside the trainable function);
ideal wall = Σ own time / concurrency; overhead = sweep wall (``Tuner.fit`` to the last MLflow
write, i.e. :func:`tuning.sweep.run_sweep`'s ``wall_s``) − ideal wall. Ends with
``overhead_fraction: <x>`` (long sweep) and ``overhead_s_per_trial: <x>`` (short sweep).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from trainables.config import RunConfig
from tuning.sweep import SweepOptions, run_sweep
from tuning.tracking import default_tracking_uri


def measure(name: str, base: RunConfig, trials: int, concurrency: int, out: Path) -> dict[str, float]:
    opts = SweepOptions(
        name=name, space="baseline", base=base, trials=trials, concurrency=concurrency, objective="val_acc",
        tracking_uri=default_tracking_uri(out), output=out, seed=0,
    )
    outcome = run_sweep(opts, log=lambda _: None)
    own = outcome["results"].get_dataframe()["time_total_s"].astype(float)
    ideal = float(own.sum()) / concurrency
    wall = float(outcome["wall_s"])
    return {"trials": trials, "wall": wall, "own_mean": float(own.mean()), "ideal": ideal,
            "overhead": wall - ideal, "fraction": (wall - ideal) / wall,
            "per_trial": (wall - ideal) * concurrency / trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--short-trials", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    long_base = RunConfig().replace(epochs=args.epochs)
    short_base = RunConfig().replace(**{"epochs": 1, "task.train_size": 32, "measure.enabled": False})
    with tempfile.TemporaryDirectory() as folder:
        long = measure("overhead-long", long_base, args.trials, args.concurrency, Path(folder) / "long")
        short = measure("overhead-short", short_base, args.short_trials, args.concurrency, Path(folder) / "short")
    print(f"{'sweep':<7} {'trials':>6} {'wall s':>8} {'own s/trial':>12} {'ideal s':>8} {'overhead s':>11} "
          f"{'fraction':>9} {'s/trial':>8}")
    for label, row in (("long", long), ("short", short)):
        print(f"{label:<7} {row['trials']:>6.0f} {row['wall']:>8.1f} {row['own_mean']:>12.2f} {row['ideal']:>8.1f} "
              f"{row['overhead']:>11.1f} {row['fraction']:>9.3f} {row['per_trial']:>8.2f}")
    print(f"concurrency {args.concurrency}, CPUs {os.cpu_count()}; goals: fraction ≤ 0.10 for ≥ 30 s trials, "
          "≤ 0.5 s per trial with actor reuse")
    print(f"overhead_fraction: {long['fraction']:.4f}")
    print(f"overhead_s_per_trial: {short['per_trial']:.3f}")


if __name__ == "__main__":
    main()
