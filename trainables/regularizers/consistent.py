"""Consistent (backward-corrected) loss under class-conditional label noise, SPEC §3.3.

With transition matrix F (F_jk = P(noisy = k | clean = j)), the loss on a noisy label ỹ is
    ℓ̄(x, ỹ) = Σ_c (F⁻¹)_{ỹ,c} · (−log p_c(x)),
an unbiased estimate of the clean loss (Natarajan et al. 2013; Patrini et al. 2017). F is the
symmetric matrix of a given rate, or estimated from a plain fine-tuned model (Dual-T style:
anchor points × confusion counts, Yao et al. 2020). A singular F is rejected: the paper's code
silently trains on a label-independent loss when r ≥ (K−1)/K.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import ConfigError, ConsistentConfig
from trainables.noise import symmetric_transition
from trainables.regularizers.base import Regularizer, RunContext

__all__ = ["ConsistentLoss", "backward_corrected_loss", "estimate_transition"]

MAX_CONDITION = 1e3


def backward_corrected_loss(logits: torch.Tensor, labels: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Per-sample Σ_c (F⁻¹)_{ỹ,c}·(−log p_c)."""
    nll = -F.log_softmax(logits, dim=1)
    return (inverse.to(nll)[labels] * nll).sum(dim=1)


def estimate_transition(probs: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Dual-T style estimate F = T_anchor · T_count from a plain model's probabilities.

    T_anchor row i: the probability vector of the sample with the largest p_i after dropping
    values at or above the 97th percentile (outliers). T_count: row-normalised counts of
    (predicted class → noisy label).
    """
    anchor = np.zeros((num_classes, num_classes))
    for i in range(num_classes):
        col = probs[:, i]
        kept = np.flatnonzero(col < np.percentile(col, 97)) if len(col) > 1 else np.arange(len(col))
        kept = kept if len(kept) else np.arange(len(col))
        anchor[i] = probs[kept[np.argmax(col[kept])]]
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (probs.argmax(axis=1), noisy), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    count_t = np.where(totals > 0, counts / np.maximum(totals, 1.0), np.eye(num_classes))
    est = anchor @ count_t
    return est / est.sum(axis=1, keepdims=True)


def checked_inverse(matrix: np.ndarray, log: object = None) -> np.ndarray:
    cond = float(np.linalg.cond(matrix))
    if not np.isfinite(cond) or cond > 1e12:
        raise ConfigError("the noise transition matrix F is singular: its rows must be linearly independent")
    if cond > MAX_CONDITION and callable(log):
        log(f"warning: transition matrix condition number {cond:.3g} is large; the consistent loss will be noisy")
    return np.linalg.inv(matrix)


class ConsistentLoss(Regularizer):
    name = "consistent"

    def __init__(self, cfg: ConsistentConfig) -> None:
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.transition = self._transition(ctx)
        self.inverse = torch.as_tensor(checked_inverse(self.transition, ctx.log))

    def _transition(self, ctx: RunContext) -> np.ndarray:
        k = ctx.num_classes
        if self.cfg.transition == "estimated":
            model = ctx.fit_plain(self.cfg.estimate_epochs)
            probs = _train_probabilities(model, ctx)
            return estimate_transition(probs, ctx.noisy.numpy(), k)
        if self.cfg.transition == "task":
            if ctx.transition is None:
                raise ConfigError(
                    "consistent.transition=task needs injected label noise (a known F): use symmetric or estimated"
                )
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


def _train_probabilities(model: torch.nn.Module, ctx: RunContext) -> np.ndarray:
    from trainables.loop import predict

    x = getattr(ctx, "train_x", None)
    if x is None:
        raise RuntimeError("estimating F needs the training images in the run context")
    return torch.softmax(predict(model, x), dim=1).double().numpy()
