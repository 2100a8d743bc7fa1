"""End-of-trial Hessian measures and the bound built on them (docs/measures.md §1, §4).

- M = Σ_i √H_i / √n, H_i = max_j max(v_iᵀ H_ii(x_j, y_j) v_i, 0) over the measure sample set S
  (the training set capped at ``measure.samples`` by a seeded subset; its size is recorded).
- B = L̂ + √C · M with a trial-independent C:
  * ``fwd`` (when the noise transition matrix F is known and has no zero entry):
    L̂ = mean −log((Fᵀp)_ỹ), the forward-corrected training loss, bounded by C = −log(min F);
  * ``trunc`` otherwise: L̂ = mean min(CE, C) with C = ``measure.loss_bound`` or 2·log K.
  Never the trained model's own max loss: that rewards models that memorised noisy labels.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import RunConfig
from trainables.data import TaskData
from trainables.models import predict

# Lanczos keeps at most this many parameter-sized vectors, restarting from its top Ritz vector
# when it fills them: λ_max's memory stays within 3× a training step on a 4.9 M-parameter model
# (benchmarks/hessian_memory.py --model resnet10t; docs/measures.md §6)
EIGEN_BASIS = 5

__all__ = ["bound_metrics", "bound_terms", "measure_model", "measure_subset", "per_sample_ce"]


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def bound_terms(
    logits: torch.Tensor, labels: torch.Tensor, transition: np.ndarray | None, loss_bound: float | None
) -> tuple[float, float, str]:
    """(L̂, C, kind) of the bound: forward-corrected loss when possible, else truncated CE."""
    k = logits.shape[1]
    if loss_bound is None and transition is not None and float(transition.min()) > 0:
        probs = torch.softmax(logits.double(), dim=1) @ torch.as_tensor(transition, dtype=torch.float64)
        fwd = -torch.log(probs[torch.arange(len(labels)), labels])
        return float(fwd.mean()), -math.log(float(transition.min())), "fwd"
    cap = loss_bound if loss_bound is not None else 2.0 * math.log(k)
    ce = per_sample_ce(logits.double(), labels).clamp(max=cap)
    return float(ce.mean()), cap, "trunc"


def bound_metrics(
    measure: float, logits: torch.Tensor, labels: torch.Tensor, transition: np.ndarray | None, loss_bound: float | None
) -> dict[str, float]:
    """B = L̂ + √C·M and its parts as logged: ``bound``, ``bound_loss``, ``bound_C``, ``bound_fwd``."""
    loss_hat, c, kind = bound_terms(logits, labels, transition, loss_bound)
    return {
        "bound": loss_hat + math.sqrt(c) * measure,
        "bound_loss": loss_hat,
        "bound_C": c,
        "bound_fwd": 1.0 if kind == "fwd" else 0.0,
    }


def measure_subset(n: int, cap: int, seed: int) -> torch.Tensor:
    """Indices of the measure sample set S: all n samples, or a seeded sorted subset of ``cap``."""
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def _batches(
    x: torch.Tensor, y: torch.Tensor, device: torch.device, size: int = 64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(xb.to(device), yb.to(device)) for xb, yb in zip(x.split(size), y.split(size), strict=True)]


def measure_model(
    model: nn.Module,
    reference: dict[str, torch.Tensor],
    data: TaskData,
    cfg: RunConfig,
    *,
    transition: np.ndarray | None,
) -> dict[str, float]:
    """All end-of-trial measures as flat metrics (``measure``, ``bound``, ``h/<layer>``, ...)."""
    from trainables.hessian import hessian_trace
    from trainables.hessian.curvature import measure_layer_curvatures
    from trainables.hessian.eigen import top_eigenvalue_estimate

    mc = cfg.measure
    device = next(model.parameters()).device
    train = data.train
    n = len(train)
    tic = time.perf_counter()
    idx = measure_subset(n, mc.samples, cfg.seed)
    batches = _batches(train.x[idx], train.labels[idx], device)
    curv = measure_layer_curvatures(model, per_sample_ce, batches, reference)  # max and mean, one pass
    h_max, h_mean = curv.max, curv.mean
    out: dict[str, float] = {
        "measure": sum(math.sqrt(v) for v in h_max.values()) / math.sqrt(n),
        "measure_mean": sum(math.sqrt(max(v, 0.0)) for v in h_mean.values()) / math.sqrt(n),
        "measure_samples": float(len(idx)),
        "measure_s": time.perf_counter() - tic,
    }
    out.update({f"h/{name}": value for name, value in h_max.items()})
    out.update(bound_metrics(out["measure"], predict(model, train.x), train.labels, transition, mc.loss_bound))
    gen = torch.Generator().manual_seed(cfg.seed)
    # HVPs keep a double-backward graph per batch: at the training batch size their memory stays
    # within a few training steps (benchmarks/hessian_memory.py)
    step = cfg.optim.batch_size
    if mc.trace:
        tic = time.perf_counter()
        hvp_batches = _batches(train.x[idx], train.labels[idx], device, size=step)
        out["trace"], out["trace_se"] = hessian_trace(
            model, per_sample_ce, hvp_batches, rel_tol=mc.trace_rel_tol, max_probes=mc.trace_max_probes, generator=gen
        )
        out["trace_s"] = time.perf_counter() - tic
    if mc.eigenvalue:
        tic = time.perf_counter()
        eig_idx = idx[: mc.eigen_samples]
        eig_batches = _batches(train.x[eig_idx], train.labels[eig_idx], device, size=step)
        eigen = top_eigenvalue_estimate(
            model,
            per_sample_ce,
            eig_batches,
            iters=mc.eigen_iters,
            rel_tol=mc.eigen_rel_tol,
            generator=gen,
            basis_size=EIGEN_BASIS,
        )
        out["lambda_max"], out["lambda_max_residual"] = eigen.value, eigen.residual
        out["lambda_max_iters"] = float(eigen.iterations)
        out["lambda_max_s"] = time.perf_counter() - tic
    return out
