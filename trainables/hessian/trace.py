"""Trace of the Hessian of the mean loss: doubly stochastic Hutchinson with per-layer traces.

tr H̄ = E_z[zᵀ H̄ z] for Rademacher z (Hutchinson 1989), H̄ = (1/N) Σ_j ∇²ℓ_j over all N samples
of ``data``. Each round k takes the next batch b_k (cycling through ``data``) and ``probes_per_batch``
fresh probes z on it, t_k = mean_z zᵀ H_{b_k} z with H_b the Hessian of the batch-mean loss; the
estimate is the batch-size-weighted mean Σ_k |b_k| t_k / Σ_k |b_k|, so unequal batches get the
weight of their samples. The probes of a round share their batch, so the rounds, not the probes,
are the independent samples the standard error is computed from. Sampling stops on that standard
error (not PyHessian's relative-change rule, docs/measures.md §5). The same products give
unbiased per-parameter traces z_iᵀ(H z)_i, since cross-block terms have zero mean. HVPs by double
backward (:class:`~trainables.hessian.operator.HessianOperator`); the probes of a round reuse one graph, which makes
a product about 2.2× a gradient instead of 3.0–3.2× on ``test_resnet`` (``benchmarks/hessian_cost.py``),
and are drawn one at a time, so a round holds one probe and one product, whatever its size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainables.hessian._model import Batch, BatchSource, LossFn, evaluation_mode, trainable_names
from trainables.hessian.operator import HessianOperator

__all__ = ["TraceEstimate", "hessian_trace", "hessian_trace_per_layer", "rademacher"]

_MIN_PROBES = 10  # products before the standard error may stop sampling
_MIN_ROUNDS = 5  # and independent rounds (batches), when a round holds several probes
PROBES_PER_BATCH = 4


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of tr H̄, its standard error, and per-parameter traces with theirs."""

    trace: float
    stderr: float
    n_probes: int
    per_layer: dict[str, float]
    per_layer_stderr: dict[str, float]


def rademacher(shape: torch.Size | Sequence[int], generator: torch.Generator, like: Tensor) -> Tensor:
    """±1 entries drawn from ``generator`` (on its device), with ``like``'s dtype and device."""
    signs = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device)
    return (signs * 2 - 1).to(device=like.device, dtype=like.dtype)


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator`` or, when None, a CPU generator seeded with 0 (results are reproducible)."""
    return generator if generator is not None else torch.Generator().manual_seed(0)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    rel_tol: float = 0.05,
    max_probes: int = 1000,
    generator: torch.Generator | None = None,
    params: Sequence[str] | None = None,
    probes_per_batch: int = PROBES_PER_BATCH,
) -> tuple[float, float]:
    """(estimate, standard error) of tr H̄, the Hessian of the mean loss over ``data``.

    See :func:`hessian_trace_per_layer` for the arguments.
    """
    result = hessian_trace_per_layer(
        model,
        loss_fn,
        data,
        rel_tol=rel_tol,
        max_probes=max_probes,
        generator=generator,
        params=params,
        probes_per_batch=probes_per_batch,
    )
    return result.trace, result.stderr


def hessian_trace_per_layer(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    rel_tol: float = 0.05,
    max_probes: int = 1000,
    generator: torch.Generator | None = None,
    params: Sequence[str] | None = None,
    probes_per_batch: int = PROBES_PER_BATCH,
) -> TraceEstimate:
    """Doubly stochastic Hutchinson estimate of tr H̄ and of every parameter block's trace.

    Stops when the standard error ≤ ``rel_tol``·|estimate| after at least 10 products and 5
    rounds (10 rounds when ``probes_per_batch`` is 1), or after ``max_probes`` products.
    ``probes_per_batch``: products per batch from one graph (1: one fresh batch per product).
    ``params``: parameter names spanning the Hessian (default: all with ``requires_grad``).
    ``generator`` draws the probes (default: seeded with 0), so results are deterministic for a
    given generator and data order. Runs in eval mode (modes restored).
    """
    if not rel_tol >= 0:
        raise ValueError(f"rel_tol={rel_tol!r} must be ≥ 0 (0 runs all max_probes products)")
    if isinstance(max_probes, bool) or not isinstance(max_probes, int) or max_probes < 1:
        raise ValueError(f"max_probes={max_probes!r} must be a positive int")
    if isinstance(probes_per_batch, bool) or not isinstance(probes_per_batch, int) or probes_per_batch < 1:
        raise ValueError(f"probes_per_batch={probes_per_batch!r} must be a positive int")
    min_rounds = max(math.ceil(_MIN_PROBES / probes_per_batch), _MIN_ROUNDS)
    names = trainable_names(model, params)
    source = BatchSource.of(data, model, reiterable=True)
    rng = default_generator(generator)
    samples: list[Tensor] = []  # per round: per-parameter mean z_iᵀ(Hz)_i, float64 on CPU
    totals: list[float] = []
    weights: list[float] = []
    products = 0
    with evaluation_mode(model):
        operator = HessianOperator(model, loss_fn, names)
        leaves = list(operator.leaves.values())
        for x, y in _cycle(source):
            count = min(probes_per_batch, max_probes - products)
            probes = ([rademacher(leaf.shape, rng, leaf) for leaf in leaves] for _ in range(count))
            per_probe = operator.batch_products(probes, x, y, reduce=_per_parameter_quadratic_forms)
            samples.append(torch.stack(per_probe).mean(0).to("cpu", torch.float64))
            totals.append(float(samples[-1].sum()))
            weights.append(float(x.shape[0]))
            products += count
            if products >= max_probes or (products >= _MIN_PROBES and _converged(totals, weights, rel_tol, min_rounds)):
                break
    return _summarise(names, torch.stack(samples), weights, products)


def _per_parameter_quadratic_forms(probe: Sequence[Tensor], product: list[Tensor]) -> Tensor:
    """[z_iᵀ (H z)_i per parameter tensor i]: all a probe leaves behind (its vectors are freed)."""
    return torch.stack([(z * h).sum() for z, h in zip(probe, product, strict=True)])


def _cycle(source: BatchSource) -> Iterator[Batch]:
    while True:
        yield from source


def _weighted_mean_and_stderr(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Σw t/Σw and its linearised standard error √(k/(k−1)·Σ w²(t − m)²)/Σw (= s/√k for equal w)."""
    total = weights.sum()
    w = weights[:, None] if values.dim() > 1 else weights
    mean = (w * values).sum(0) / total
    count = values.shape[0]
    if count < 2:
        return mean, torch.full_like(mean, math.inf)
    spread = (w**2 * (values - mean) ** 2).sum(0)
    return mean, torch.sqrt(spread * count / (count - 1)) / total


def _converged(totals: list[float], weights: list[float], rel_tol: float, min_rounds: int) -> bool:
    if len(totals) < min_rounds:
        return False
    mean, stderr = _weighted_mean_and_stderr(
        torch.tensor(totals, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    )
    return bool(stderr <= rel_tol * mean.abs())


def _summarise(names: Sequence[str], samples: Tensor, weights: list[float], products: int) -> TraceEstimate:
    w = torch.tensor(weights, dtype=torch.float64)
    mean, stderr = _weighted_mean_and_stderr(samples.sum(1), w)
    layer_means, layer_errors = _weighted_mean_and_stderr(samples, w)
    return TraceEstimate(
        trace=float(mean),
        stderr=float(stderr),
        n_probes=products,
        per_layer=dict(zip(names, layer_means.tolist(), strict=True)),
        per_layer_stderr=dict(zip(names, layer_errors.tolist(), strict=True)),
    )
