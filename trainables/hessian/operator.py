"""One Hessian operator for the trace, λ_max and the paper-code reference (docs/measures.md §5–6).

:class:`HessianOperator` holds what every Hessian–vector product needs: the model, the per-sample
loss, the parameters spanning the Hessian (detached leaves, so the model's own parameters, their
``requires_grad`` and ``.grad`` are never touched) and their shapes. It gives products on one
batch (several vectors on one retained graph, :func:`~trainables.hessian._derivatives.batch_hvps`)
and the product with the mean Hessian H̄ = Σ_b (|b|/N) H_b over a fixed set of batches, on flat
vectors, which is what Lanczos iterates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trainables.hessian._derivatives import batch_hvps
from trainables.hessian._model import BatchSource, LossFn

__all__ = ["HessianOperator"]


class HessianOperator:
    """Products with the Hessian of ``loss_fn``'s batch mean w.r.t. the parameters ``names``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, names: Sequence[str]) -> None:
        params = dict(model.named_parameters())
        self.model, self.loss_fn, self.names = model, loss_fn, list(names)
        self.leaves = {name: params[name].detach().requires_grad_(True) for name in self.names}
        self.shapes = [leaf.shape for leaf in self.leaves.values()]
        self.size = sum(leaf.numel() for leaf in self.leaves.values())
        first = next(iter(self.leaves.values()))
        self.device, self.dtype = first.device, first.dtype

    def batch_products(
        self,
        vectors: Iterable[Sequence[Tensor]],
        x: Tensor,
        y: Tensor,
        reduce: Callable[[Sequence[Tensor], list[Tensor]], Any] | None = None,
    ) -> list[Any]:
        """[H_b v for v in vectors] on the batch (x, y), one retained graph; see ``batch_hvps``."""
        return batch_hvps(self.model, self.loss_fn, self.leaves, vectors, x, y, reduce)

    def batch_product(self, vector: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
        """H_b v on the batch (x, y), per parameter tensor."""
        return self.batch_products([vector], x, y)[0]

    def pieces(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat vector as one tensor per parameter."""
        sizes = [shape.numel() for shape in self.shapes]
        return [piece.view(shape) for piece, shape in zip(flat.split(sizes), self.shapes, strict=True)]

    def mean_product(self, flat: Tensor, source: BatchSource) -> Tensor:
        """H̄ v over every batch of ``source``, as a new flat vector (summed in place per batch)."""
        pieces = self.pieces(flat)
        total = torch.zeros_like(flat)
        parts = total.split([shape.numel() for shape in self.shapes])
        count = 0
        for x, y in source:
            product = self.batch_product(pieces, x, y)
            for part, piece in zip(parts, product, strict=True):
                part.add_(piece.reshape(-1), alpha=x.shape[0])
            del product
            count += x.shape[0]
        return total.div_(count)
