"""Wall-clock cost of one training step: plain SGD/Adam vs NSO (k = 1) and SAM.

Runs the real :func:`trainables.loop.train_step` on real run objects (timm ``test_resnet``, random
init, 5 classes, a fixed batch of 32 random 3×32×32 images). Methods are interleaved over
repeats so that machine load affects all of them alike; each figure is the median over repeats
of the mean step time within a repeat, after warm-up. NSO's target is ≤ 2.1× plain SGD (2 passes;
the reference implementation pays 3× because it always runs an extra clean pass).

Two clocks: wall time, and on CPU the CPU time of this thread (torch runs on one thread by
default here, so that is all the step's compute). On a shared machine other processes inflate
wall time unevenly; the CPU-time ratios are the cost figures printed last (wall time on CUDA).

    uv run python benchmarks/step_cost.py [--repeats 15] [--steps 5] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainables.config import RunConfig
from trainables.data import Split, TaskData
from trainables.loop import Run, prepare, train_step

BATCH = 32
CLASSES = 5

METHODS: dict[str, dict[str, object]] = {
    "sgd": {"optim.name": "sgd"},
    "adam": {"optim.name": "adam"},
    "nso_k1": {
        "optim.name": "sgd",
        "nso.enabled": True,
        "nso.k": 1,
        "nso.lam": 0.0,
        "nso.bn_stats": "pair_mean",
    },
    "sam": {"optim.name": "sgd", "sam.enabled": True},
}


def random_task(image_size: int = 32) -> TaskData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, image_size, image_size, generator=gen)
    y = torch.arange(BATCH) % CLASSES
    split = Split(x, y, y.clone())
    return TaskData(split, None, split, y.clone(), CLASSES, None)


def make_run(overrides: dict[str, object], data: TaskData, device: str) -> Run:
    base = RunConfig.from_dict(
        {
            "model": {"name": "test_resnet", "pretrained": "none"},
            "task": {"noise": {"kind": "none", "rate": 0.0}},
            "optim": {"lr": 1e-3, "batch_size": BATCH},
            "measure": {"enabled": False},
            "device": device,
            "epochs": 1,
        }
    )
    return prepare(base.replace(**overrides), data, log=lambda _: None)


def time_steps(run: Run, x: torch.Tensor, index: torch.Tensor, steps: int) -> tuple[float, float]:
    """Mean (wall, CPU-thread) seconds per step over ``steps`` consecutive steps."""
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        train_step(run, x, index, epoch=1)
    sync()
    return (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = random_task()
    runs = {name: make_run(over, data, args.device) for name, over in METHODS.items()}
    x, index = data.train.x.to(args.device), torch.arange(BATCH)
    for run in runs.values():
        time_steps(run, x, index, args.warmup)
        run.passes[:] = [0, 0]
        run.steps = 0
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            wall, cpu = time_steps(runs[name], x, index, args.steps)
            walls[name].append(wall)
            cpus[name].append(cpu)
    wall_ms = {name: 1e3 * statistics.median(t) for name, t in walls.items()}
    cpu_ms = {name: 1e3 * statistics.median(t) for name, t in cpus.items()}
    cost = wall_ms if args.device.startswith("cuda") or args.threads != 1 else cpu_ms
    print(
        f"test_resnet, batch {BATCH}×3×32×32, device {args.device}, {args.threads} thread(s), "
        f"{args.repeats} repeats × {args.steps} steps, medians"
    )
    header = ("method", "wall ms", "× sgd", "cpu ms", "× sgd", "fwd/step", "bwd/step")
    print("{:<8} {:>8} {:>6} {:>8} {:>6} {:>9} {:>9}".format(*header))
    for name, run in runs.items():
        fwd, bwd = (p / max(run.steps, 1) for p in run.passes)
        print(
            f"{name:<8} {wall_ms[name]:>8.2f} {wall_ms[name] / wall_ms['sgd']:>6.2f} "
            f"{cpu_ms[name]:>8.2f} {cpu_ms[name] / cpu_ms['sgd']:>6.2f} {fwd:>9.2f} {bwd:>9.2f}"
        )
    print(f"nso_k1_over_sgd: {cost['nso_k1'] / cost['sgd']:.3f}")
    print(f"sam_over_sgd: {cost['sam'] / cost['sgd']:.3f}")


if __name__ == "__main__":
    main()
