"""Self-labeling (REGSL): label correction and soft down-weighting.

Correction (from epoch E_c): where the model's max softmax probability exceeds p_thr and its
argmax differs from the current label, the label is replaced (permanently, used at once).
Down-weighting (from epoch E_r): batch loss Σ_j w_j ℓ_j with w = softmax(−ℓ/τ) over the batch,
weights detached; after each epoch t > E_r, τ = τ0 · max(0.5, exp(−0.1 (t − E_r))).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainables.config import SelfLabelConfig
from trainables.regularizers.base import Regularizer

__all__ = ["SelfLabeling", "downweighted_loss", "temperature"]


def temperature(cfg: SelfLabelConfig, epoch: int) -> float:
    """τ in force during ``epoch`` (1-indexed): decayed at the end of each epoch after E_r."""
    done = epoch - 1  # epochs already finished
    if done <= cfg.reweight_start:
        return cfg.temperature
    return cfg.temperature * max(0.5, math.exp(-0.1 * (done - cfg.reweight_start)))


def downweighted_loss(losses: torch.Tensor, tau: float) -> torch.Tensor:
    weights = torch.softmax(-losses.detach() / tau, dim=0)
    return (weights * losses).sum()


class SelfLabeling(Regularizer):
    name = "self_label"

    def __init__(self, cfg: SelfLabelConfig) -> None:
        self.cfg = cfg

    @torch.no_grad()
    def relabel(self, logits: torch.Tensor, index: torch.Tensor, epoch: int) -> None:
        if epoch < self.cfg.correct_start:
            return
        conf, pred = torch.softmax(logits.detach(), dim=1).max(dim=1)
        labels = self.ctx.labels
        change = (conf > self.cfg.threshold) & (pred != labels[index].to(pred.device))
        labels[index[change.cpu()]] = pred[change].to(labels.device)

    def reduce(self, losses: torch.Tensor, epoch: int) -> torch.Tensor | None:
        if epoch < self.cfg.reweight_start:
            return None
        return downweighted_loss(losses, temperature(self.cfg, epoch))

    def end_epoch(self, epoch: int) -> dict[str, float]:
        labels, noisy, clean = self.ctx.labels, self.ctx.noisy, self.ctx.clean
        metrics = {"sl_changed": float((labels != noisy).float().mean())}
        if clean is not None:
            changed = labels != noisy
            was_wrong = noisy != clean
            metrics["sl_precision"] = _fraction(labels[changed] == clean[changed])
            metrics["sl_recall"] = _fraction(labels[was_wrong] == clean[was_wrong])
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.ctx.labels.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ctx.labels.copy_(state["labels"])


def _fraction(hits: torch.Tensor) -> float:
    """Mean of a boolean tensor; NaN when it is empty (nothing to measure)."""
    return float(hits.float().mean()) if hits.numel() else float("nan")
