"""Regularizers, one module each, all on the :class:`Regularizer` interface.

:func:`build_regularizers` maps the enabled sections of a :class:`RunConfig` to instances through
one registry; they combine freely, except that at most one may compute the gradient (NSO or SAM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainables.config import RunConfig
from trainables.regularizers.base import Closure, Regularizer, RunContext
from trainables.regularizers.consistent import ConsistentLoss
from trainables.regularizers.constraint import DistanceConstraint
from trainables.regularizers.nso import NSO
from trainables.regularizers.sam import SAM
from trainables.regularizers.self_label import SelfLabeling

__all__ = ["REGISTRY", "Closure", "Regularizer", "RunContext", "build_regularizers", "enabled_regularizers"]

REGISTRY: dict[str, Callable[[Any], Regularizer]] = {
    "constraint": DistanceConstraint,
    "self_label": SelfLabeling,
    "consistent": ConsistentLoss,
    "nso": NSO,
    "sam": SAM,
}


def build_regularizers(cfg: RunConfig) -> list[Regularizer]:
    """Instances for every enabled regularizer section, in registry order."""
    return [REGISTRY[name](getattr(cfg, name)) for name in enabled_regularizers(cfg)]


def enabled_regularizers(cfg: RunConfig) -> list[str]:
    """The names of the regularizer sections ``cfg`` enables, in registry order."""
    return [name for name in REGISTRY if getattr(cfg, name).enabled]
