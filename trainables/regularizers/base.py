"""The one interface every regularizer implements (docs/design.md).

The training loop knows these hooks, not the regularizers. Every hook has a no-op default, so a
regularizer overrides only what it changes:

- ``setup``: once, before training, with the :class:`RunContext`;
- ``relabel``: may rewrite the batch's training labels (self-labeling);
- ``sample_loss``: per-sample loss from logits and labels (consistent loss; default CE);
- ``reduce``: batch loss from per-sample losses (down-weighting; default mean);
- ``penalty``: a term added to the loss (L2-SP-style distance penalty);
- ``gradient``: computes the step's gradient itself from a forward/backward closure (NSO, SAM);
- ``after_step``: after each optimizer step (projection onto distance balls);
- ``end_epoch``: at the end of each epoch; returns metrics to report;
- ``state_dict`` / ``load_state_dict``: what a checkpoint must hold to resume exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from trainables.models import LayerGroups

__all__ = ["Closure", "Regularizer", "RunContext"]


class Closure(Protocol):
    """Runs forward (+ backward unless ``backward=False``) at the current weights; returns the loss.

    Gradients accumulate into ``.grad``. The batch's labels are fixed by the first call.
    """

    def __call__(self, backward: bool = True) -> torch.Tensor: ...


@dataclass
class RunContext:
    """What a regularizer may read (and, for ``labels``, write) during a run."""

    model: nn.Module
    reference: dict[str, torch.Tensor]  # every parameter at the start of fine-tuning
    groups: LayerGroups
    labels: torch.Tensor  # current training labels, indexed by sample; self-labeling writes here
    noisy: torch.Tensor  # the given (noisy) training labels, never modified
    clean: torch.Tensor | None  # known clean labels (synthetic noise), for diagnostics only
    num_classes: int
    epochs: int
    transition: np.ndarray | None  # the run's noise matrix F: injected and revealed, else estimated
    noise_rate: float
    generator: torch.Generator
    log: Callable[[str], None]


class Regularizer:
    """Base class: all hooks are optional no-ops."""

    name: ClassVar[str] = ""
    changes_gradient: ClassVar[bool] = False
    # its training loss targets the clean labels (the consistent loss): the true gap is then
    # measured against the clean test labels, not a noisy copy
    targets_clean_labels: ClassVar[bool] = False

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def relabel(self, logits: torch.Tensor, index: torch.Tensor, epoch: int) -> None:
        return None

    def sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        return None

    def reduce(self, losses: torch.Tensor, epoch: int) -> torch.Tensor | None:
        return None

    def penalty(self) -> torch.Tensor | None:
        return None

    def gradient(self, closure: Closure, epoch: int) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        return None

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
