"""Peak memory of the Hessian measures against one training step, on a timm model (CPU).

Each phase runs in a fresh process (so that no allocator cache carries over), after building the
model and the data; its memory is the rise of the process's peak resident set size
(``ru_maxrss``) during the phase. Phases, with the product's defaults (``trainables.measures``):

- ``step``: three Adam training steps at batch 32 in train mode (the reference);
- ``measure``: the exact per-sample M over S = 448 samples in batches of 64;
- ``trace``: Hutchinson over S in batches of 32 (the training batch), 4 probes per batch, stopping
  as the product does (``measure.trace_rel_tol``, ``measure.trace_max_probes``);
- ``lambda_max``: Lanczos over ``measure.eigen_samples`` samples in batches of 32, stopping on its
  residual as the product does (``measure.eigen_iters``, ``measure.eigen_rel_tol``), with the
  product's basis cap (``trainables.measures.EIGEN_BASIS``).

``--model`` picks the timm model (default ``test_resnet``, 0.4 M parameters; ``resnet10t``, 4.9 M,
is the larger one the README's cost table quotes), 3×32×32 inputs either way.
Prints one row per phase and ends with ``<phase>_over_step: <ratio>`` lines. The issue's goal is
"memory stays within ~3× a training step". RSS is coarse (pages, allocator arenas): differences of
a few MB are noise, which is why the phases run at the product's real batch sizes.

    uv run python benchmarks/hessian_memory.py [--samples 448] [--model resnet10t]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainables.config import MeasureConfig

PHASES = ("step", "measure", "trace", "lambda_max")
DEFAULTS = MeasureConfig()  # the product's settings


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _phase(name: str, samples: int, model_name: str, queue: mp.Queue) -> None:
    import torch
    from hessian_cost import make_data, make_model, make_reference, per_sample_cross_entropy

    from trainables.hessian import hessian_trace, layer_curvatures
    from trainables.hessian.eigen import top_eigenvalue_estimate
    from trainables.measures import EIGEN_BASIS

    torch.set_num_threads(1)
    model = make_model(model_name)
    x, y = make_data(samples)
    reference = make_reference(model)
    batches = list(zip(x.split(64), y.split(64), strict=True))
    step_batches = list(zip(x.split(32), y.split(32), strict=True))
    with torch.no_grad():
        model.eval()(x[:64])  # first-call allocations belong to no phase
    before = _peak_kib()
    if name == "step":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for start in (0, 32, 64):
            optimizer.zero_grad(set_to_none=True)
            per_sample_cross_entropy(model(x[start : start + 32]), y[start : start + 32]).mean().backward()
            optimizer.step()
    elif name == "measure":
        layer_curvatures(model.eval(), per_sample_cross_entropy, batches, reference, reduce="max")
    elif name == "trace":
        hessian_trace(
            model.eval(),
            per_sample_cross_entropy,
            step_batches,
            rel_tol=DEFAULTS.trace_rel_tol,
            max_probes=DEFAULTS.trace_max_probes,
        )
    else:
        top_eigenvalue_estimate(
            model.eval(),
            per_sample_cross_entropy,
            step_batches[: DEFAULTS.eigen_samples // 32],
            iters=DEFAULTS.eigen_iters,
            rel_tol=DEFAULTS.eigen_rel_tol,
            basis_size=EIGEN_BASIS,
        )
    queue.put((_peak_kib() - before) / 1024)


def measure_phase(name: str, samples: int, model: str) -> float:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(name, samples, model, queue))
    proc.start()
    mib = queue.get(timeout=3600)
    proc.join()
    return float(mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=448)
    parser.add_argument("--model", default="test_resnet", help="timm model name (resnet10t: the larger one)")
    args = parser.parse_args()
    rise = {name: measure_phase(name, args.samples, args.model) for name in PHASES}
    print(f"{args.model}, {args.samples} samples, 1 thread, peak RSS rise per phase (fresh process each)")
    for name in PHASES:
        print(f"{name:<12}{rise[name]:>10.1f} MiB{rise[name] / rise['step']:>8.2f} x step")
    for name in PHASES[1:]:
        print(f"{name}_over_step: {rise[name] / rise['step']:.3f}")


if __name__ == "__main__":
    main()
