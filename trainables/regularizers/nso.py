"""Noise stability optimization (Zhang, Li & Ju, TMLR 2024).

Per step, with U_j ~ N(0, σ²I) on every trainable parameter (j = 1..k) and the same batch:
    g = (1/2k) Σ_j [∇f(W + U_j) + ∇f(W − U_j)]        (optionally λ∇f(W) + (1 − λ)g),
then the base optimizer steps at W. That is 2k forward/backward passes (the reference code
always runs an extra clean pass, 3× SGD at k = 1; we do not when λ = 0).

Noise: U_j = σξ_j, each ξ_j one flat ``torch.randn`` draw over all trainable parameters (in
``model.parameters()`` order, in the first parameter's dtype) from the run's generator;
on an accelerator the draw comes from a device generator re-seeded from the run's generator each
step, so runs stay reproducible and resumable. The weights are restored by copying a saved W
(``(W + U) − U`` is not exactly W in floating point).

BatchNorm: no perturbed pass updates the running statistics on its own. By default
(``bn_stats="pair_mean"``) they are updated once per step with the mean of the ± passes' batch
statistics, which equals the clean statistics up to O(σ²) because the ±U terms cancel;
``clean_forward`` runs an extra no-grad forward at W first instead (exact, +1 forward);
``frozen`` never updates them during NSO steps. With λ > 0 the clean pass runs first and
updates them (except under ``frozen``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from trainables.config import NSOConfig
from trainables.regularizers.base import Closure, Regularizer, RunContext

__all__ = ["NSO", "BatchNormGuard", "sigma_at"]


def sigma_at(cfg: NSOConfig, epoch: int, epochs: int) -> float:
    """σ for ``epoch`` (1-indexed): constant, or linear / exponential warm-up to σ at the end."""
    if cfg.schedule == "constant" or epochs <= 1:
        return cfg.sigma
    frac = (epoch - 1) / (epochs - 1)
    if cfg.schedule == "linear":
        return cfg.sigma * max(frac, 1.0 / epochs)
    return math.exp(math.log(1e-5) + frac * (math.log(cfg.sigma) - math.log(1e-5)))


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics."""
    norm = nn.modules.batchnorm._BatchNorm
    return [m for m in model.modules() if isinstance(m, norm) and m.track_running_stats]


class BatchNormGuard:
    """Controls BatchNorm running statistics across several passes of one step.

    Each perturbed pass runs with the statistics snapshotted by :meth:`start` (or construction)
    and its own update is undone afterwards; ``pair_mean`` keeps the sum of the updated mean/var
    for :meth:`finish`. Buffers are allocated once, so a guard can be reused step after step.
    """

    def __init__(self, model: nn.Module | list[nn.modules.batchnorm._BatchNorm], mode: str) -> None:
        self.mode = mode
        modules = model if isinstance(model, list) else batchnorms(model)
        self.stats: list[torch.Tensor] = [s for m in modules for s in (m.running_mean, m.running_var)]  # type: ignore[misc]
        self.counts: list[torch.Tensor] = [m.num_batches_tracked for m in modules]  # type: ignore[misc]
        self.saved = [s.clone() for s in self.stats]
        self.saved_counts = [c.clone() for c in self.counts]
        self.total = [torch.zeros_like(s) for s in self.stats] if mode == "pair_mean" else []
        self.passes = 0

    def start(self) -> BatchNormGuard:
        """Snapshot the current statistics at the start of a step."""
        if self.stats:
            torch._foreach_copy_(self.saved, self.stats)
            torch._foreach_copy_(self.saved_counts, self.counts)
        self.passes = 0
        return self

    @contextmanager
    def perturbed_pass(self) -> Iterator[None]:
        """Run one perturbed pass; its own update to the statistics is undone afterwards."""
        yield
        if not self.stats:
            return
        if self.mode == "pair_mean":
            if self.passes == 0:
                torch._foreach_copy_(self.total, self.stats)
            else:
                torch._foreach_add_(self.total, self.stats)
        self.passes += 1
        torch._foreach_copy_(self.stats, self.saved)
        torch._foreach_copy_(self.counts, self.saved_counts)

    def finish(self) -> None:
        """``pair_mean``: running stats ← mean over passes of the stats each pass would have set."""
        if self.mode != "pair_mean" or not self.stats or self.passes == 0:
            return
        torch._foreach_mul_(self.total, 1.0 / self.passes)
        torch._foreach_copy_(self.stats, self.total)
        torch._foreach_add_(self.counts, 1)  # one step's worth


class NSO(Regularizer):
    name = "nso"
    changes_gradient = True

    def __init__(self, cfg: NSOConfig) -> None:
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.params: list[torch.Tensor] = [p for p in ctx.model.parameters() if p.requires_grad]
        self.bns = batchnorms(ctx.model)
        self.guard = BatchNormGuard(self.bns, "frozen" if self._clean_first else self.cfg.bn_stats)
        self._device_generator: torch.Generator | None = None
        self._flat: torch.Tensor | None = None
        self._saved: list[torch.Tensor] | None = None

    @property
    def _clean_first(self) -> bool:
        """A pass at W runs first: λ > 0 needs ∇f(W); ``clean_forward`` takes BN statistics there."""
        return self.cfg.lam > 0 or self.cfg.bn_stats == "clean_forward"

    def gradient(self, closure: Closure, epoch: int) -> torch.Tensor | None:
        params, cfg = self.params, self.cfg
        sigma = sigma_at(cfg, epoch, self.ctx.epochs)
        clean = self._clean_pass(closure) if self._clean_first else None
        guard = self.guard.start()  # after the clean pass: perturbed passes restore its statistics
        saved = self._saved_weights()
        for p in params:
            p.grad = None  # the 2k passes accumulate Σ ∇f(W ± U_j) into .grad
        losses = []
        for _ in range(cfg.k):
            xi = self.draw_standard_normal()
            # W + σξ, then (W + σξ) − 2σξ = W − σξ up to an ulp (one op instead of restore + add;
            # the estimator does not care), then W restored exactly from the saved copy.
            for alpha in (sigma, -2.0 * sigma):
                with torch.no_grad():
                    torch._foreach_add_(params, xi, alpha=alpha)
                with guard.perturbed_pass():
                    losses.append(closure().detach())
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        guard.finish()
        self._combine(clean, (1.0 - cfg.lam) / (2 * cfg.k))
        return torch.stack(losses).mean()

    def draw_standard_normal(self) -> list[torch.Tensor]:
        """ξ for every trainable parameter: views of one flat standard-normal draw (U = σξ).

        The flat buffer is reused across steps (no allocation per step); filling it with
        ``normal_`` gives the same numbers as ``torch.randn(N, generator=g, dtype=...)``.
        """
        first = self.params[0]
        if self._flat is None:
            size = sum(p.numel() for p in self.params)
            self._flat = torch.empty(size, dtype=first.dtype, device=first.device)
        self._flat.normal_(generator=self._generator(first.device))
        views = self._flat.split([p.numel() for p in self.params])
        return [v.view_as(p).to(p) for v, p in zip(views, self.params, strict=True)]

    def _saved_weights(self) -> list[torch.Tensor]:
        """A copy of W in buffers reused across steps; W is restored from it exactly."""
        if self._saved is None:
            self._saved = [p.detach().clone() for p in self.params]
        else:
            torch._foreach_copy_(self._saved, [p.detach() for p in self.params])
        return self._saved

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.ctx.generator
        if self._device_generator is None:
            self._device_generator = torch.Generator(device)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.ctx.generator))
        return self._device_generator.manual_seed(seed)

    def _combine(self, clean: list[torch.Tensor | None] | None, scale: float) -> None:
        """.grad ← scale·Σ(perturbed gradients) [+ λ∇f(W)]; parameters no pass reached keep None."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        for p, g in zip(self.params, clean or [], strict=False):
            if g is not None:
                p.grad = g * self.cfg.lam if p.grad is None else p.grad.add_(g, alpha=self.cfg.lam)

    def _clean_pass(self, closure: Closure) -> list[torch.Tensor | None] | None:
        """Runs first, at W: λ > 0 returns ∇f(W); ``clean_forward`` is a no-grad forward only.

        Running first also lets self-labeling see the clean logits.
        """
        frozen = self.guard.start() if self.cfg.bn_stats == "frozen" else None
        with frozen.perturbed_pass() if frozen else nullcontext():
            if self.cfg.lam == 0:
                with torch.no_grad():
                    closure(backward=False)
                return None
            for p in self.params:
                p.grad = None
            closure()
        return [p.grad for p in self.params]
