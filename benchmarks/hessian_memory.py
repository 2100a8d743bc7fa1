"""Peak memory of the Hessian measures against one training step, on timm ``test_resnet`` (CPU).

Each phase runs in a fresh process (so that no allocator cache carries over), after building the
model and the data; its memory is the rise of the process's peak resident set size
(``ru_maxrss``) during the phase. Phases, with the product's defaults (``trainables.measures``):

- ``step``: three Adam training steps at batch 32 in train mode (the reference);
- ``measure``: the exact per-sample M over S = 448 samples in batches of 64;
- ``trace``: Hutchinson over S in batches of 32 (the training batch), 4 probes per batch, up to
  48 products;
- ``lambda_max``: Lanczos, 15 iterations over 128 samples in batches of 32.

Prints one row per phase and ends with ``<phase>_over_step: <ratio>`` lines. The issue's goal is
"memory stays within ~3× a training step". RSS is coarse (pages, allocator arenas): differences of
a few MB are noise, which is why the phases run at the product's real batch sizes.

    uv run python benchmarks/hessian_memory.py [--samples 448]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = ("step", "measure", "trace", "lambda_max")


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _phase(name: str, samples: int, queue: mp.Queue) -> None:
    import torch
    from hessian_cost import make_data, make_model, make_reference, per_sample_cross_entropy

    from trainables.hessian import hessian_trace, layer_curvatures, top_eigenvalue

    torch.set_num_threads(1)
    model = make_model()
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
        hessian_trace(model.eval(), per_sample_cross_entropy, step_batches, rel_tol=0.05, max_probes=48)
    else:
        top_eigenvalue(model.eval(), per_sample_cross_entropy, step_batches[:4], iters=15)
    queue.put((_peak_kib() - before) / 1024)


def measure_phase(name: str, samples: int) -> float:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(name, samples, queue))
    proc.start()
    mib = queue.get(timeout=600)
    proc.join()
    return float(mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=448)
    args = parser.parse_args()
    rise = {name: measure_phase(name, args.samples) for name in PHASES}
    print(f"test_resnet, {args.samples} samples, 1 thread, peak RSS rise per phase (fresh process each)")
    for name in PHASES:
        print(f"{name:<12}{rise[name]:>10.1f} MiB{rise[name] / rise['step']:>8.2f} x step")
    for name in PHASES[1:]:
        print(f"{name}_over_step: {rise[name] / rise['step']:.3f}")


if __name__ == "__main__":
    main()
