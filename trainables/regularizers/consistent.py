"""Consistent (backward-corrected) loss under class-conditional label noise.

With transition matrix F (F_jk = P(noisy = k | clean = j)), the loss on a noisy label ỹ is
    ℓ̄(x, ỹ) = Σ_c (F⁻¹)_{ỹ,c} · (−log p_c(x)),
an unbiased estimate of the clean loss (Natarajan et al. 2013; Patrini et al. 2017). F is the
symmetric matrix of a given rate, or the run's F (``task``: the injected noise's when revealed,
else the estimate of trainables.transition; ``estimated``: always the estimate). A singular F is
rejected: the paper's code silently trains on a label-independent loss when r ≥ (K−1)/K.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import ConfigError, ConsistentConfig
from trainables.noise import symmetric_transition
from trainables.regularizers.base import Regularizer, RunContext

__all__ = ["ConsistentLoss", "backward_corrected_loss"]

MAX_CONDITION = 1e3


def backward_corrected_loss(logits: torch.Tensor, labels: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Per-sample Σ_c (F⁻¹)_{ỹ,c}·(−log p_c)."""
    nll = -F.log_softmax(logits, dim=1)
    return (inverse.to(nll)[labels] * nll).sum(dim=1)


def checked_inverse(matrix: np.ndarray, log: object = None) -> np.ndarray:
    cond = float(np.linalg.cond(matrix))
    if not np.isfinite(cond) or cond > 1e12:
        raise ConfigError("the noise transition matrix F is singular: its rows must be linearly independent")
    if cond > MAX_CONDITION and callable(log):
        log(f"warning: transition matrix condition number {cond:.3g} is large; the consistent loss will be noisy")
    return np.linalg.inv(matrix)


class ConsistentLoss(Regularizer):
    name = "consistent"
    targets_clean_labels = True

    def __init__(self, cfg: ConsistentConfig) -> None:
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.transition = self._transition(ctx)
        self.inverse = torch.as_tensor(checked_inverse(self.transition, ctx.log))

    def _transition(self, ctx: RunContext) -> np.ndarray:
        k = ctx.num_classes
        if self.cfg.transition in ("task", "estimated"):  # the loop made ctx.transition the estimate for the latter
            if ctx.transition is None:
                raise ConfigError(f"consistent.transition={self.cfg.transition} found no noise matrix for this run")
            return ctx.transition
        rate = self.cfg.rate if self.cfg.rate is not None else ctx.noise_rate
        if rate >= (k - 1) / k:
            raise ConfigError(
                f"consistent.rate={rate} makes the transition matrix singular for K={k} classes "
                f"(needs r < (K−1)/K = {(k - 1) / k:.3f}): use a smaller rate"
            )
        return symmetric_transition(k, rate)

    def sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        return backward_corrected_loss(logits, labels, self.inverse)
