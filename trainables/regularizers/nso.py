"""Noise stability optimization (Zhang, Li & Ju, TMLR 2024), SPEC §3.4.

Per step, with U_j ~ N(0, σ²I) on every trainable parameter (j = 1..k) and the same batch:
    g = (1/2k) Σ_j [∇f(W + U_j) + ∇f(W − U_j)]        (optionally λ∇f(W) + (1 − λ)g),
then the base optimizer steps at W. That is 2k forward/backward passes (the reference code
always runs an extra clean pass, 3× SGD at k = 1; we do not when λ = 0).

BatchNorm: no perturbed pass updates the running statistics on its own. By default
(``bn_stats="pair_mean"``) they are updated once per step with the mean of the ± passes' batch
statistics, which equals the clean statistics up to O(σ²) because the ±U terms cancel;
``clean_forward`` runs an extra no-grad forward at W instead (exact, +1 forward);
``frozen`` never updates them during NSO steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from trainables.config import NSOConfig
from trainables.regularizers.base import Closure, Regularizer

__all__ = ["NSO", "BatchNormGuard", "sigma_at"]


def sigma_at(cfg: NSOConfig, epoch: int, epochs: int) -> float:
    """σ for ``epoch`` (1-indexed): constant, or linear / exponential warm-up to σ at the end."""
    if cfg.schedule == "constant" or epochs <= 1:
        return cfg.sigma
    frac = (epoch - 1) / (epochs - 1)
    if cfg.schedule == "linear":
        return cfg.sigma * max(frac, 1.0 / epochs)
    return math.exp(math.log(1e-5) + frac * (math.log(cfg.sigma) - math.log(1e-5)))


class BatchNormGuard:
    """Controls BatchNorm running statistics across several passes of one step."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        self.mode = mode
        self.modules = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        self.saved = [self._read(m) for m in self.modules]
        self.after: list[list[list[torch.Tensor]]] = []

    @staticmethod
    def _read(m: nn.Module) -> list[torch.Tensor]:
        return [m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()]  # type: ignore[union-attr]

    @staticmethod
    def _write(m: nn.Module, values: list[torch.Tensor]) -> None:
        for buf, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), values, strict=True):
            buf.copy_(value)  # type: ignore[union-attr]

    @contextmanager
    def perturbed_pass(self) -> Iterator[None]:
        """Run one perturbed pass; its own update to the statistics is undone afterwards."""
        yield
        self.after.append([self._read(m) for m in self.modules])
        for m, values in zip(self.modules, self.saved, strict=True):
            self._write(m, values)

    def finish(self) -> None:
        """``pair_mean``: running stats ← mean over passes of the stats each pass would have set."""
        if self.mode != "pair_mean" or not self.after:
            return
        for i, m in enumerate(self.modules):
            mean = torch.stack([a[i][0] for a in self.after]).mean(0)
            var = torch.stack([a[i][1] for a in self.after]).mean(0)
            self._write(m, [mean, var, self.after[0][i][2]])


class NSO(Regularizer):
    name = "nso"
    changes_gradient = True

    def __init__(self, cfg: NSOConfig) -> None:
        self.cfg = cfg

    def params_passes(self) -> int:
        return 2 * self.cfg.k + (1 if self.cfg.lam > 0 else 0)

    def gradient(self, closure: Closure, epoch: int) -> torch.Tensor | None:
        params = [p for p in self.ctx.model.parameters() if p.requires_grad]
        sigma = sigma_at(self.cfg, epoch, self.ctx.epochs)
        clean_stats = self.cfg.lam > 0 or self.cfg.bn_stats == "clean_forward"
        guard = BatchNormGuard(self.ctx.model, "frozen" if clean_stats else self.cfg.bn_stats)
        total = [torch.zeros_like(p) for p in params]
        losses = []
        for _ in range(self.cfg.k):
            noise = [torch.randn(p.shape, generator=self.ctx.generator).to(p) * sigma for p in params]
            for sign in (1.0, -1.0):
                losses.append(self._pass_at(params, noise, sign, closure, guard, total))
        guard.finish()
        scale = (1.0 - self.cfg.lam) / (2 * self.cfg.k)
        for p, g in zip(params, total, strict=True):
            p.grad = g * scale
        if clean_stats:
            self._clean_pass(params, closure)
        return torch.stack(losses).mean()

    def _pass_at(
        self, params: list[torch.Tensor], noise: list[torch.Tensor], sign: float,
        closure: Closure, guard: BatchNormGuard, total: list[torch.Tensor],
    ) -> torch.Tensor:
        with torch.no_grad():
            for p, u in zip(params, noise, strict=True):
                p.add_(u, alpha=sign)
        for p in params:
            p.grad = None
        with guard.perturbed_pass():
            loss = closure()
        with torch.no_grad():
            for p, u, g in zip(params, noise, total, strict=True):
                p.sub_(u, alpha=sign)
                if p.grad is not None:
                    g.add_(p.grad)
        return loss.detach()

    def _clean_pass(self, params: list[torch.Tensor], closure: Closure) -> None:
        """λ > 0: add λ∇f(W); ``clean_forward``: a no-grad forward at W for BN statistics only."""
        if self.cfg.lam == 0:
            with torch.no_grad():
                closure(backward=False)
            return
        noisy = [p.grad for p in params]
        for p in params:
            p.grad = None
        closure()
        for p, g in zip(params, noisy, strict=True):
            clean = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = clean * self.cfg.lam if g is None else g + clean * self.cfg.lam
