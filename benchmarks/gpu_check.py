"""The Hessian measures on a GPU, in one command (issue #3's open item: CUDA paths unverified).

On ``--device`` (default cuda), with ``benchmarks/hessian_cost.py``'s model (timm ``test_resnet``),
data and reference, and the same generators as on the CPU:

1. **Agreement with the CPU**: the per-layer max forms of M, the Hutchinson trace (the probes come
   from a CPU generator, so both devices use the same ones) and λ_max (same start vector), as the
   largest relative difference. Measured twice: with PyTorch's default TF32 setting for cuDNN
   convolutions (on by default: 10-bit mantissas on Ampere and later GPUs) and with TF32 off.
2. **Cost on the device** (synchronised medians): an HVP in a round of 4 and a lone HVP over a
   gradient; the per-sample max measure over a training epoch, against its floor (1 + L)/3.
3. **Memory on the device**: the peak allocated bytes of each measure over that of three Adam
   training steps at batch 32 (``torch.cuda.max_memory_allocated``; CPU: not measured, see
   ``hessian_memory.py``).
4. With ``--sweep``: a 4-trial smoke sweep with ``--gpus-per-trial 0.5 --set device=cuda``
   (fractional GPUs; a trial without a GPU would fail on device=cuda).

Ends with ``KEY: VALUE`` lines. ``--device cpu`` runs the same code against the CPU itself (the CI
smoke test, ``tests/test_gpu_check.py``).

    uv run python benchmarks/gpu_check.py [--device cuda] [--samples 448] [--repeats 10] [--sweep]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hessian_cost import (
    TRAIN_BATCH,
    epoch_task,
    hvp_tasks,
    interleaved_medians,
    make_data,
    make_model,
    make_reference,
    per_sample_cross_entropy,
)

from trainables.hessian import hessian_trace, layer_curvatures, top_eigenvalue
from trainables.hessian.trace import PROBES_PER_BATCH

Batches = list[tuple[Tensor, Tensor]]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """cuDNN convolutions and CUDA matmuls in TF32 (``enabled``) or full fp32, restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def measures(model: nn.Module, batches: Batches, reference: dict[str, Tensor]) -> dict[str, float]:
    """M's per-layer max forms, trace and λ_max with fixed generators (the product's batch sizes)."""
    forms = layer_curvatures(model, per_sample_cross_entropy, batches, reference, reduce="max")
    small = training_batches(batches)
    trace, _ = hessian_trace(
        model, per_sample_cross_entropy, small, max_probes=48, generator=torch.Generator().manual_seed(5)
    )
    top = top_eigenvalue(
        model, per_sample_cross_entropy, small[:4], iters=15, generator=torch.Generator().manual_seed(6)
    )
    return {**{f"h/{name}": value for name, value in forms.items()}, "trace": trace, "lambda_max": top}


def training_batches(batches: Batches) -> Batches:
    """``batches`` re-cut at the training batch size (trace and Lanczos run there, as in a trial)."""
    return [(x[i : i + TRAIN_BATCH], y[i : i + TRAIN_BATCH]) for x, y in batches for i in range(0, len(x), TRAIN_BATCH)]


def largest_relative_difference(a: dict[str, float], b: dict[str, float]) -> float:
    """max_k |a_k − b_k| / |b_k|, a layer's form measured against at least 1e-6 of the largest form
    (a form near zero has no meaningful relative error in fp32)."""
    largest_form = max((abs(v) for k, v in b.items() if k.startswith("h/")), default=0.0)
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6 * largest_form if k.startswith("h/") else 0.0, 1e-30) for k in b)


def setup(device: torch.device, samples: int) -> tuple[nn.Module, Batches, dict[str, Tensor]]:
    model = make_model().to(device).eval()
    x, y = make_data(samples)
    batches = [(xb.to(device), yb.to(device)) for xb, yb in zip(x.split(64), y.split(64), strict=True)]
    return model, batches, make_reference(model)


def agreement(device: torch.device, samples: int) -> dict[str, float]:
    model, batches, reference = setup(torch.device("cpu"), samples)
    cpu = measures(model, batches, reference)
    out = {}
    for enabled in (True, False):
        with tf32(enabled):
            out[f"agree_tf32_{'on' if enabled else 'off'}"] = largest_relative_difference(
                measures(*setup(device, samples)), cpu
            )
    return out


def cost(device: torch.device, samples: int, repeats: int) -> dict[str, float]:
    model, batches, reference = setup(device, samples)
    sync: Callable[[], object] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    step = interleaved_medians(hvp_tasks(model, x[:TRAIN_BATCH], y[:TRAIN_BATCH]), repeats, sync)
    whole = interleaved_medians(
        {
            "epoch": epoch_task(model, x, y),
            "measure": lambda: layer_curvatures(model, per_sample_cross_entropy, batches, reference, reduce="max"),
        },
        max(3, repeats // 3),
        sync,
    )
    layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    return {
        "hvp_over_grad": step["hvp_round"] / PROBES_PER_BATCH / step["gradient"],
        "lone_hvp_over_grad": step["hvp"] / step["gradient"],
        "measure_over_floor": whole["measure"] / whole["epoch"] / ((1 + layers) / 3),
    }


def memory(device: torch.device, samples: int) -> dict[str, float]:
    """Peak allocated bytes of each phase (above what is allocated before it) over a training step's."""
    if device.type != "cuda":
        return {}
    model, batches, reference = setup(device, samples)
    x, y = torch.cat([b[0] for b in batches[:2]]), torch.cat([b[1] for b in batches[:2]])

    def steps() -> None:  # three Adam steps at batch 32, lr 0 (the weights stay as measured)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
        for start in (0, 32, 64):
            optimizer.zero_grad(set_to_none=True)
            per_sample_cross_entropy(model(x[start : start + 32]), y[start : start + 32]).mean().backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    def peak(phase: Callable[[], object]) -> int:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        phase()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small = training_batches(batches)
    step = peak(steps)
    phases: dict[str, Callable[[], object]] = {
        "measure": lambda: layer_curvatures(model, per_sample_cross_entropy, batches, reference, reduce="max"),
        "trace": lambda: hessian_trace(model, per_sample_cross_entropy, small, max_probes=48),
        "lambda_max": lambda: top_eigenvalue(model, per_sample_cross_entropy, small[:4], iters=15),
    }
    return {f"{name}_memory_over_step": peak(phase) / step for name, phase in phases.items()}


def sweep(output: Path) -> dict[str, float]:
    """A 4-trial smoke sweep on fractional GPUs through the CLI; returns its exit status."""
    command = [
        sys.executable,
        "-m",
        "tuning.cli",
        "sweep",
        "--space",
        "smoke",
        "--trials",
        "4",
        "--gpus-per-trial",
        "0.5",
        "--set",
        "device=cuda",
        "--output",
        str(output),
        "--name",
        "gpu-check",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return {"sweep_exit_status": float(proc.returncode)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="also run a 4-trial sweep at --gpus-per-trial 0.5")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: error: --device {args.device} but CUDA is not available: use --device cpu", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}, {args.samples} samples")
    results = {
        **agreement(device, args.samples),
        **cost(device, args.samples, args.repeats),
        **memory(device, args.samples),
    }
    if args.sweep:
        with tempfile.TemporaryDirectory() as folder:
            results.update(sweep(Path(folder)))
    for key, value in results.items():
        print(f"{key}: {value:.3g}" if math.isfinite(value) else f"{key}: nan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
