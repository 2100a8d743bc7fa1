"""Layer-wise distance constraints (REGSL, Li & Zhang NeurIPS 2021).

After every optimizer step each constrained weight tensor is projected onto its Frobenius ball
    W ← W0 + (W − W0) · min(1, D_i / ‖W − W0‖_F),
with D_i = D·γ^g for depth group g (or D·s_g with free per-group scales) and D_head for the head.
The paper's code measures the head from zero; we measure it from its initial value unless
``head_from_zero`` is set. The penalty variant adds λ·s_g‖W − W0‖² instead of projecting.
"""

from __future__ import annotations

import torch

from trainables.config import ConfigError, ConstraintConfig
from trainables.regularizers.base import Regularizer, RunContext

__all__ = ["DistanceConstraint", "group_radii"]


def group_radii(cfg: ConstraintConfig, num_groups: int) -> list[float]:
    """Radius per body depth group: D·γ^g, or D·s_g when free scales are given."""
    if cfg.group_scales is None:
        return [cfg.radius * cfg.growth**g for g in range(num_groups)]
    if len(cfg.group_scales) != num_groups:
        raise ConfigError(
            f"constraint.group_scales has {len(cfg.group_scales)} values but the model has "
            f"{num_groups} depth groups: give one scale per group"
        )
    return [cfg.radius * s for s in cfg.group_scales]


def project_(weight: torch.Tensor, center: torch.Tensor, radius: float) -> None:
    """In place: move ``weight`` onto the ball ‖W − center‖_F ≤ radius (inside points stay)."""
    delta = weight - center
    norm = float(delta.norm())
    if norm > radius:
        weight.copy_(center + delta * (radius / norm))


class DistanceConstraint(Regularizer):
    name = "constraint"

    def __init__(self, cfg: ConstraintConfig) -> None:
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        params = dict(ctx.model.named_parameters())
        radii = group_radii(self.cfg, len(ctx.groups.groups))
        self.balls: list[tuple[torch.Tensor, torch.Tensor, float, float]] = []
        for g, names in enumerate(ctx.groups.groups):
            scale = radii[g] / self.cfg.radius
            self.balls += [(params[n], ctx.reference[n], radii[g], scale) for n in names]
        for n in ctx.groups.head:
            center = torch.zeros_like(ctx.reference[n]) if self.cfg.head_from_zero else ctx.reference[n]
            self.balls.append((params[n], center, self.cfg.head_radius, 1.0))

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.mode != "projection":
            return
        for weight, center, radius, _ in self.balls:
            project_(weight, center, radius)

    def penalty(self) -> torch.Tensor | None:
        if self.cfg.mode != "penalty":
            return None
        terms = [scale * (w - c).pow(2).sum() for w, c, _, scale in self.balls]
        return self.cfg.penalty * torch.stack(terms).sum()
