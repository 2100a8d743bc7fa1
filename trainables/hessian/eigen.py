"""Largest algebraic eigenvalue of the Hessian of the mean loss, by Lanczos.

The operator is v ↦ H̄ v = Σ_b (|b|/N) H_b v over all batches of ``data`` (exact, deterministic:
every matvec passes over the same data), H_b the Hessian of the batch-mean loss, by double
backward. Lanczos with full reorthogonalisation (against every previous Lanczos vector, twice)
builds the tridiagonal T_k; the answer is T_k's largest *algebraic* eigenvalue (``which='LA'``),
not the largest magnitude that power iteration converges to (hessian.md §1.6). Lanczos stops
early on an invariant subspace (β ≈ 0), so k ≥ #distinct eigenvalues is exact (hessian.md §6.4).

Memory: ``iters`` parameter-sized vectors are kept for the reorthogonalisation, in one
preallocated matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from trainables.hessian._derivatives import batch_hvp
from trainables.hessian._model import Batch, BatchSource, LossFn, evaluation_mode, trainable_names
from trainables.hessian.trace import default_generator

__all__ = ["lanczos_tridiagonal", "top_eigenvalue"]


class _MeanHessian:
    """Matvecs with H̄ on flat vectors, over every batch of ``source``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, source: BatchSource, names: Sequence[str]) -> None:
        params = dict(model.named_parameters())
        self.model, self.loss_fn, self.source = model, loss_fn, source
        self.leaves = {name: params[name].detach().requires_grad_(True) for name in names}
        self.shapes = [leaf.shape for leaf in self.leaves.values()]
        self.size = sum(leaf.numel() for leaf in self.leaves.values())
        first = next(iter(self.leaves.values()))
        self.device, self.dtype = first.device, first.dtype

    def __call__(self, flat: Tensor) -> Tensor:
        pieces = [piece.view(shape) for piece, shape in
                  zip(flat.split([s.numel() for s in self.shapes]), self.shapes, strict=True)]
        total = torch.zeros_like(flat)
        count = 0
        for x, y in self.source:
            product = batch_hvp(self.model, self.loss_fn, self.leaves, pieces, x, y)
            total += x.shape[0] * torch.cat([p.reshape(-1) for p in product])
            count += x.shape[0]
        return total / count


def lanczos_tridiagonal(matvec: Callable[[Tensor], Tensor], start: Tensor, iters: int) -> Tensor:
    """The k×k tridiagonal Lanczos matrix T_k (float64) of a symmetric ``matvec``, from ``start``.

    k = min(iters, dimension), or fewer when an invariant subspace is found (β ≈ 0).
    """
    steps = min(iters, start.numel())
    basis = start.new_empty(steps, start.numel())  # filled row by row: no copy of the basis per step
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for step in range(steps):
        w = matvec(basis[step])
        alphas.append(float(basis[step] @ w))
        if step == steps - 1:
            break
        done = basis[: step + 1]
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - done.T @ (done @ w)
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if beta <= 100 * torch.finfo(w.dtype).eps * scale:
            break
        betas.append(beta)
        basis[step + 1] = w / beta
    off = torch.tensor(betas, dtype=torch.float64)
    return torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)


def top_eigenvalue(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch], *, iters: int = 20,
                   generator: torch.Generator | None = None, params: Sequence[str] | None = None) -> float:
    """λ_max(H̄): largest algebraic eigenvalue of the Hessian of the mean loss over ``data``.

    ``iters`` Lanczos iterations (each one HVP pass over all of ``data``), started from a Gaussian
    vector drawn from ``generator`` (default: seeded with 0). ``params``: parameter names spanning
    the Hessian (default: all with ``requires_grad``). Eval mode; modes restored.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r} must be a positive int (15-30 is typical)")
    names = trainable_names(model, params)
    source = BatchSource.of(data, model, reiterable=True)
    rng = default_generator(generator)
    with evaluation_mode(model):
        operator = _MeanHessian(model, loss_fn, source, names)
        start = torch.randn(operator.size, generator=rng, device=rng.device, dtype=torch.float64)
        tridiagonal = lanczos_tridiagonal(operator, start.to(operator.device, operator.dtype), iters)
    return float(torch.linalg.eigvalsh(tridiagonal).max())
