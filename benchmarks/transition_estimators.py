"""How well each noise-matrix estimator recovers the injected F on a task (docs/transition.md).

    python benchmarks/transition_estimators.py                        # Fashion-MNIST, the study's grid
    python benchmarks/transition_estimators.py --task digits --sizes 224,448

For every noise setting, training size and seed: the task's split and noise draw, features of the
``source`` model, out-of-fold probabilities (trainables.transition), and each estimator's F. Prints
the largest absolute entry error ‖F̂ − F‖_max per estimator (mean and worst over the grid), and the
line ``best_estimator: NAME`` (lowest mean error). Then the noise structure
(trainables.noise.noise_structure, 0 = spread evenly, 1 = one class each) of the default
estimator's F̂ per noise kind: the ranges the end-of-sweep report's noise case is cut from.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="fashion-mnist")
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--sizes", default="500,2000", help="training sizes (validation: 0.4 × each)")
    p.add_argument(
        "--settings",
        default="symmetric:0.2,symmetric:0.4,symmetric:0.6,pair:0.2,pair:0.4,pair:0.6,"
        "correlated:0.2,correlated:0.4,correlated:0.6",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--csv",
        help="write one row per draw (the default estimator's error, noise rate and "
        "structure) here, e.g. results/fashion/noise_case.csv for the selection study",
    )
    args = p.parse_args(argv)

    from trainables.config import ModelConfig, NoiseConfig, TaskConfig
    from trainables.data import load_task
    from trainables.models import create_model, features
    from trainables.noise import noise_rate, noise_structure
    from trainables.transition import ESTIMATORS, estimate_from_probabilities, out_of_fold_probabilities

    errors: dict[str, list[float]] = {m: [] for m in ESTIMATORS}
    structure: dict[str, list[float]] = {}  # noise kind → the default estimator's noise_structure(F̂)
    draws: list[dict[str, object]] = []
    default = NoiseConfig().estimator
    tic = time.perf_counter()
    print(
        f"{'setting':<15} {'size':>5} {'seed':>4}  " + "  ".join(f"{m:>9}" for m in ESTIMATORS) + "  structure",
        flush=True,
    )
    for setting in args.settings.split(","):
        kind, rate = setting.split(":")
        for size in map(int, args.sizes.split(",")):
            for seed in map(int, args.seeds.split(",")):
                task = TaskConfig(
                    name=args.task,
                    train_size=size,
                    val_size=round(0.4 * size),
                    split_seed=seed,
                    noise=NoiseConfig(kind=kind, rate=float(rate)),
                )  # type: ignore[arg-type]
                data = load_task(task)
                model = create_model(ModelConfig(args.model, "source"), data.num_classes, task=task)
                feats = features(model, data.train.x).double().numpy()
                noisy = data.train.labels.numpy()
                probs = out_of_fold_probabilities(feats, noisy, data.num_classes, seed=seed)
                row = []
                for method in ESTIMATORS:
                    estimate = estimate_from_probabilities(probs, noisy, method)
                    err = float(np.abs(estimate - data.transition).max())
                    errors[method].append(err)
                    row.append(err)
                    if method == default:
                        structure.setdefault(kind, []).append(noise_structure(estimate))
                        draws.append(
                            {
                                "setting": f"{kind}{round(100 * float(rate))}",
                                "kind": kind,
                                "rate": float(rate),
                                "train_size": size,
                                "seed": seed,
                                "f_error": err,
                                "f_noise_rate": noise_rate(estimate),
                                "f_structure": structure[kind][-1],
                            }
                        )
                print(
                    f"{setting:<15} {size:>5} {seed:>4}  "
                    + "  ".join(f"{e:9.3f}" for e in row)
                    + f"  {structure[kind][-1]:9.3f}",
                    flush=True,
                )
    print(f"\n{len(errors['anchor'])} draws in {time.perf_counter() - tic:.0f} s")
    for method, errs in errors.items():
        print(f"{method:>9}: mean {np.mean(errs):.3f}  worst {np.max(errs):.3f}")
    print(f"best_estimator: {min(errors, key=lambda m: np.mean(errors[m]))}")
    print(f"\nnoise structure of the {default} estimate (0 = spread evenly, 1 = one class each):")
    for kind, values in structure.items():
        print(f"  {kind:<11} min {np.min(values):.3f}  mean {np.mean(values):.3f}  max {np.max(values):.3f}")
    if args.csv:
        import pandas as pd

        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(draws).to_csv(args.csv, index=False, float_format="%.4g")
        print(f"per-draw rows: {args.csv}")


if __name__ == "__main__":
    main()
