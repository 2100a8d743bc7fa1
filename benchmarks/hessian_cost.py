"""Cost of the Hessian measures against plain training, on timm ``test_resnet``.

Setup: ``timm.create_model('test_resnet', num_classes=5)`` with its BatchNorm scales re-drawn in
[0.5, 1.5] (timm zero-initialises the last BN of each block, which would make several layers'
curvature identically zero; the cost is the same), S = 448 random 3×32×32 images with random
labels, reference = weights − 0.01·noise, float32, all CPU threads.

Two ratios (docs/measures.md §7):

1. ``hvp_over_grad``: one Hessian-vector product of the batch-mean loss as the trace code
   computes it (double backward; ``PROBES_PER_BATCH`` = 4 products per batch share one forward
   and create_graph backward, timed together and divided by 4) / one gradient (forward +
   backward), same batch of 32, both in eval mode. Goal ≤ 2.5. A lone product (what Lanczos
   needs, one new vector per step) is printed next to it: it cannot get much below 3, because
   exact double backward runs about three times a gradient's convolutions (forward 1, first
   backward 2, second backward 6: the forward convolutions' backward again, plus two
   convolutions and two convolution gradients per layer for the cross terms, ``_conv.py``).
2. ``measure_over_floor``: (time of ``layer_curvatures(reduce="max")`` over all of S) / (time of one
   training epoch over S: batch 32, forward + backward + SGD step, train mode), divided by the
   floor (1 + L)/3 epochs of the exact per-sample max measure (L = measured weight tensors = 16).
   Goal ≤ 1.5. The forced ``method="nested"`` (plain forward-over-forward for every layer, what
   a smooth network needs) is timed once too, for comparison.

The machine may be shared: under CPU contention multi-threaded timings swing by large factors, so
use ``--threads 1`` to compare code changes; the ratios are what matter.

Methods are interleaved over repeats so that machine load hits all alike; each figure is the
median over repeats after a warm-up. Output ends with ``hvp_over_grad: <ratio>`` and
``measure_over_floor: <ratio>``.

    uv run python benchmarks/hessian_cost.py [--repeats 5] [--samples 448] [--measure-batch 64]
                                             [--threads N] [--skip-nested]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.hessian import batch_hvp, batch_hvps, layer_curvatures
from trainables.hessian.curvature import Method
from trainables.hessian.trace import PROBES_PER_BATCH

CLASSES = 5
TRAIN_BATCH = 32


def per_sample_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def make_model(name: str = "test_resnet") -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=CLASSES)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def make_data(samples: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(samples, 3, 32, 32, generator=generator),
        torch.randint(0, CLASSES, (samples,), generator=generator),
    )


def make_reference(model: nn.Module) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {
        name: p.detach() - 0.01 * torch.randn(p.shape, generator=generator).to(p.device)
        for name, p in model.named_parameters()
    }


def interleaved_medians(
    tasks: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], object] = lambda: None
) -> dict[str, float]:
    """Median wall time of each task over ``repeats`` interleaved rounds, after one warm-up round
    (``sync`` waits for queued device work, e.g. ``torch.cuda.synchronize``)."""
    for task in tasks.values():
        task()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            sync()
            start = time.perf_counter()
            task()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def hvp_tasks(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], object]]:
    params = dict(model.named_parameters())
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    generator = torch.Generator().manual_seed(3)
    vector = [torch.randn(p.shape, generator=generator).to(p.device) for p in params.values()]

    def gradient() -> object:
        loss = per_sample_cross_entropy(model(x), y).mean()
        return torch.autograd.grad(loss, list(params.values()))

    def hvp() -> object:
        return batch_hvp(model, per_sample_cross_entropy, leaves, vector, x, y)

    round_vectors = [
        [torch.randn(p.shape, generator=generator).to(p.device) for p in params.values()]
        for _ in range(PROBES_PER_BATCH)
    ]

    def hvp_round() -> object:
        return batch_hvps(model, per_sample_cross_entropy, leaves, round_vectors, x, y)

    return {"gradient": gradient, "hvp": hvp, "hvp_round": hvp_round}


def epoch_task(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay as measured

    def epoch() -> object:
        model.train()
        for start in range(0, x.shape[0], TRAIN_BATCH):
            optimizer.zero_grad(set_to_none=True)
            batch = slice(start, start + TRAIN_BATCH)
            per_sample_cross_entropy(model(x[batch]), y[batch]).mean().backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        return None

    return epoch


def measure_tasks(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> dict[str, Callable[[], object]]:
    reference = make_reference(model)
    batches = list(zip(x.split(batch), y.split(batch), strict=True))

    def task(method: Method) -> Callable[[], object]:
        return lambda: layer_curvatures(
            model, per_sample_cross_entropy, batches, reference, reduce="max", method=method
        )

    return {"auto": task("auto"), "nested": task("nested")}


def time_once(task: Callable[[], object]) -> float:
    start = time.perf_counter()
    task()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=448)
    parser.add_argument("--measure-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores available to this process")
    parser.add_argument("--skip-nested", action="store_true", help="do not time method='nested'")
    args = parser.parse_args()
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or available
    torch.set_num_threads(threads)
    model = make_model().eval()
    x, y = make_data(args.samples)
    layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    floor = (1 + layers) / 3

    step = interleaved_medians(hvp_tasks(model, x[:TRAIN_BATCH], y[:TRAIN_BATCH]), repeats=max(15, args.repeats))
    measures = measure_tasks(model, x, y, args.measure_batch)
    whole = interleaved_medians({"epoch": epoch_task(model, x, y), "auto": measures["auto"]}, repeats=args.repeats)
    whole["nested"] = math.nan if args.skip_nested else time_once(measures["nested"])

    per_product = step["hvp_round"] / PROBES_PER_BATCH
    hvp_over_grad = per_product / step["gradient"]
    epochs = {method: whole[method] / whole["epoch"] for method in ("auto", "nested")}
    print(
        f"test_resnet, {args.samples} samples, {threads} threads, torch {torch.__version__}, "
        f"median of {args.repeats} interleaved repeats"
    )
    print(f"{'quantity':<44}{'seconds':>10}{'ratio':>10}")
    print(f"{'gradient (fwd+bwd, batch 32)':<44}{step['gradient']:>10.4f}{1.0:>10.2f}")
    print(
        f"{'lone HVP, double backward (Lanczos)':<44}{step['hvp']:>10.4f}"
        f"{step['hvp'] / step['gradient']:>10.2f}  x gradient"
    )
    print(
        f"{f'HVP in a round of {PROBES_PER_BATCH} (trace), per product':<44}{per_product:>10.4f}"
        f"{hvp_over_grad:>10.2f}  x gradient"
    )
    print(f"{'training epoch over S (batch 32)':<44}{whole['epoch']:>10.4f}{1.0:>10.2f}")
    print(f"{f'floor (1 + L)/3, L = {layers}':<44}{'':>10}{floor:>10.2f}  epochs")
    for method, label in (("auto", "per-sample max measure, auto"), ("nested", "same, method='nested' (once)")):
        print(
            f"{label:<44}{whole[method]:>10.4f}{epochs[method]:>10.2f}  epochs = {epochs[method] / floor:.2f} x floor"
        )
    print(f"hvp_over_grad: {hvp_over_grad:.3f}")
    print(f"measure_over_floor: {epochs['auto'] / floor:.3f}")


if __name__ == "__main__":
    main()
