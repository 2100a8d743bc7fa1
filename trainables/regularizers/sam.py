"""Sharpness-aware minimization (Foret et al., ICLR 2021): the sharpness baseline.

g = ∇f(W + ε) with ε = ρ·∇f(W)/‖∇f(W)‖: two passes per step, the same cost as NSO at k = 1.
The second (perturbed) pass does not update BatchNorm running statistics. W is restored by
copying a saved value (``(W + ε) − ε`` is not exactly W in floating point).
"""

from __future__ import annotations

import torch

from trainables.config import SAMConfig
from trainables.regularizers.base import Closure, Regularizer, RunContext
from trainables.regularizers.nso import BatchNormGuard, batchnorms

__all__ = ["SAM"]


class SAM(Regularizer):
    name = "sam"
    changes_gradient = True

    def __init__(self, cfg: SAMConfig) -> None:
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.params: list[torch.Tensor] = [p for p in ctx.model.parameters() if p.requires_grad]
        self.bns = batchnorms(ctx.model)

    def gradient(self, closure: Closure, epoch: int) -> torch.Tensor | None:
        params = self.params
        loss = closure()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()  # type: ignore[arg-type]
        saved = [p.detach().clone() for p in params]
        guard = BatchNormGuard(self.bns, "frozen")
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=self.cfg.rho / (norm + 1e-12))
        for p in params:
            p.grad = None
        with guard.perturbed_pass():
            closure()
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        return loss.detach()
