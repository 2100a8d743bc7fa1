"""Largest algebraic eigenvalue of the Hessian of the mean loss, by Lanczos.

The operator is v ↦ H̄ v = Σ_b (|b|/N) H_b v over all batches of ``data`` (exact, deterministic:
every matvec passes over the same data), H_b the Hessian of the batch-mean loss, by double
backward. Lanczos with full reorthogonalisation (against every previous Lanczos vector, twice)
builds the tridiagonal T_k; the answer is T_k's largest *algebraic* eigenvalue (``which='LA'``),
not the largest magnitude that power iteration converges to (docs/measures.md §6). Lanczos stops
early on an invariant subspace (β ≈ 0), so k ≥ #distinct eigenvalues is exact (docs/measures.md §6).

Memory: one parameter-sized vector per iteration run is kept for the reorthogonalisation
(stopping on the residual keeps that number low), plus a few for the product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from trainables.hessian._model import Batch, BatchSource, LossFn, evaluation_mode, trainable_names
from trainables.hessian.operator import HessianOperator
from trainables.hessian.trace import default_generator

__all__ = ["EigenEstimate", "Lanczos", "lanczos_tridiagonal", "top_eigenvalue", "top_eigenvalue_estimate"]


class Lanczos(NamedTuple):
    """T_k (float64) and β_{k+1}, the norm of the part of H v_k outside the Krylov basis: the top
    Ritz pair (θ, y) of T_k has residual ‖H y − θ y‖ = β_{k+1}·|s_k| (s: θ's eigenvector of T_k)."""

    tridiagonal: Tensor
    next_beta: float
    basis: list[Tensor]  # v_1 … v_k, orthonormal

    def top(self) -> tuple[float, float]:
        """(θ, its residual): some eigenvalue of the operator lies within the residual of θ."""
        values, vectors = torch.linalg.eigh(self.tridiagonal)
        return float(values[-1]), self.next_beta * abs(float(vectors[-1, -1]))

    def top_vector(self) -> Tensor:
        """The top Ritz vector y = Σ_i s_i v_i (unit norm), where a restarted run continues."""
        s = torch.linalg.eigh(self.tridiagonal).eigenvectors[:, -1]
        y = torch.zeros_like(self.basis[0])
        for weight, v in zip(s.tolist(), self.basis, strict=True):
            y.add_(v, alpha=weight)
        return y.div_(y.norm())


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor], start: Tensor, iters: int, *, rel_tol: float = 0.0
) -> Lanczos:
    """The k×k tridiagonal Lanczos matrix T_k of a symmetric ``matvec``, from ``start``, and β_{k+1}.

    ``matvec`` returns a new tensor each call (it is updated in place here); ``start`` is
    normalised in place and becomes the first basis vector (no copy).

    k = min(iters, dimension), or fewer when an invariant subspace is found (β ≈ 0) or, with
    ``rel_tol`` > 0, once the top Ritz pair (θ, y) has converged: ‖H y − θ y‖ = β_{k+1}·|s_k|
    (s the eigenvector of T_k, s_k its last entry) ≤ rel_tol·|θ|. Then some eigenvalue lies within
    rel_tol·|θ| of θ, and θ's error is of order the residual squared over the spectral gap.
    """
    steps = min(iters, start.numel())
    basis = [start.div_(start.norm())]  # grows with the steps taken: memory ∝ iterations actually run
    alphas: list[float] = []
    betas: list[float] = []
    for step in range(steps):
        w = matvec(basis[step])  # a new vector (the matvec keeps no reference): updated in place
        alphas.append(float(basis[step] @ w))
        for _ in range(2):  # full reorthogonalisation (modified Gram–Schmidt), twice ("twice is enough")
            for v in basis:
                w.sub_(v, alpha=float(v @ w))
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if beta <= 100 * torch.finfo(w.dtype).eps * scale:
            return Lanczos(_tridiagonal(alphas, betas), 0.0, basis)  # invariant subspace: exact
        found = Lanczos(_tridiagonal(alphas, betas), beta, basis)
        if step == steps - 1 or (rel_tol > 0 and _converged(found, rel_tol)):
            return found
        betas.append(beta)
        basis.append(w.div_(beta))
    raise AssertionError("unreachable: the loop returns at its last step")


def _converged(lanczos: Lanczos, rel_tol: float) -> bool:
    """Whether T_k's top Ritz pair has residual ≤ rel_tol·|θ|."""
    value, residual = lanczos.top()
    return residual <= rel_tol * abs(value)


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    off = torch.tensor(betas, dtype=torch.float64)
    return torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)


class EigenEstimate(NamedTuple):
    """λ_max's Ritz value, its residual (some eigenvalue lies within it) and the Lanczos steps."""

    value: float
    residual: float
    iterations: int


def top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
    params: Sequence[str] | None = None,
    rel_tol: float = 0.0,
) -> float:
    """λ_max(H̄): largest algebraic eigenvalue of the Hessian of the mean loss over ``data``.

    ``iters`` Lanczos iterations (each one HVP pass over all of ``data``), started from a Gaussian
    vector drawn from ``generator`` (default: seeded with 0); with ``rel_tol`` > 0, fewer once the
    top Ritz pair's residual is ≤ rel_tol·|λ| (:func:`lanczos_tridiagonal`). ``params``: parameter
    names spanning the Hessian (default: all with ``requires_grad``). Eval mode; modes restored.
    """
    return top_eigenvalue_estimate(
        model, loss_fn, data, iters=iters, generator=generator, params=params, rel_tol=rel_tol
    ).value


def top_eigenvalue_estimate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
    params: Sequence[str] | None = None,
    rel_tol: float = 0.0,
    basis_size: int | None = None,
) -> EigenEstimate:
    """:func:`top_eigenvalue` with its residual and the Lanczos iterations (HVP passes over ``data``).

    ``basis_size`` caps the Lanczos basis, the measure's memory (one parameter-sized vector per
    basis vector): a run that fills it restarts from its top Ritz vector, the Krylov space a thick
    restart keeping one vector would continue in. The Ritz value never decreases over restarts;
    ``iters`` counts every product. None: no cap (one run of up to ``iters`` steps).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r} must be a positive int (15-30 is typical)")
    if not 0 <= rel_tol < 1:
        raise ValueError(f"rel_tol={rel_tol!r} must be in [0, 1) (0: always run all iters)")
    if basis_size is not None and (isinstance(basis_size, bool) or not isinstance(basis_size, int) or basis_size < 2):
        raise ValueError(f"basis_size={basis_size!r} must be an int ≥ 2 (or None: no cap)")
    names = trainable_names(model, params)
    source = BatchSource.of(data, model, reiterable=True)
    rng = default_generator(generator)
    with evaluation_mode(model):
        operator = HessianOperator(model, loss_fn, names)
        start = torch.randn(operator.size, generator=rng, device=rng.device, dtype=torch.float64)
        start = start.to(operator.device, operator.dtype)  # the float64 draw is freed here
        done = 0
        while True:
            steps = min(basis_size or iters, iters - done)
            run = lanczos_tridiagonal(lambda v: operator.mean_product(v, source), start, steps, rel_tol=rel_tol)
            del start  # it is the run's first basis vector now
            done += run.tridiagonal.shape[0]
            value, residual = run.top()
            settled = run.next_beta == 0.0 or (rel_tol > 0 and residual <= rel_tol * abs(value))
            if settled or done >= iters or run.tridiagonal.shape[0] < steps:
                return EigenEstimate(value, residual, done)
            start = run.top_vector()
            del run  # the old basis goes before the next one grows
