"""Sharpness-aware minimization (Foret et al., ICLR 2021): the sharpness baseline.

g = ∇f(W + ε) with ε = ρ·∇f(W)/‖∇f(W)‖: two passes per step, the same cost as NSO at k = 1.
The second (perturbed) pass does not update BatchNorm running statistics.
"""

from __future__ import annotations

import torch

from trainables.config import SAMConfig
from trainables.regularizers.base import Closure, Regularizer
from trainables.regularizers.nso import BatchNormGuard

__all__ = ["SAM"]


class SAM(Regularizer):
    name = "sam"
    changes_gradient = True

    def __init__(self, cfg: SAMConfig) -> None:
        self.cfg = cfg

    def params_passes(self) -> int:
        return 2

    def gradient(self, closure: Closure, epoch: int) -> torch.Tensor | None:
        params = [p for p in self.ctx.model.parameters() if p.requires_grad]
        loss = closure()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()  # type: ignore[arg-type]
        eps = [g * (self.cfg.rho / (norm + 1e-12)) for g in grads]
        guard = BatchNormGuard(self.ctx.model, "frozen")
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        for p in params:
            p.grad = None
        with guard.perturbed_pass():
            closure()
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)
        return loss.detach()
