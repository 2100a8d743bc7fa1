"""Hessian measures of a fine-tuned model (definitions, exactness, costs: docs/measures.md).

Public contract::

    layer_curvatures(model, loss_fn, data, reference, *, layers=None, reduce="max") -> dict[str, float]
    hessian_distance(model, loss_fn, data, reference, *, n, layers=None) -> float
    hessian_trace(model, loss_fn, data, *, rel_tol=0.05, max_probes=1000, generator=None) -> (float, float)
    top_eigenvalue(model, loss_fn, data, *, iters=20, generator=None) -> float

``loss_fn(logits, y)`` returns per-sample losses [B]; ``data`` yields (x, y) batches; layer keys
are ``model.named_parameters()`` names. Everything runs in eval mode, restores every module's
mode, and leaves parameters (values, ``requires_grad``, ``.grad``) untouched. Beyond the
contract, ``hessian_trace`` takes ``params`` and ``probes_per_batch`` (default 4: Hutchinson
products per batch from one retained graph; 1 is one fresh batch per product), and
``batch_hvp``/``batch_hvps`` are the Hessian–vector products on one batch they are built on.
"""

from trainables.hessian._derivatives import batch_hvp, batch_hvps
from trainables.hessian.curvature import (
    LayerCurvatures,
    hessian_distance,
    layer_curvatures,
    measure_layer_curvatures,
    sample_curvatures,
)
from trainables.hessian.eigen import top_eigenvalue
from trainables.hessian.operator import HessianOperator
from trainables.hessian.reference import reference_layer_curvatures
from trainables.hessian.trace import TraceEstimate, hessian_trace, hessian_trace_per_layer

__all__ = [
    "HessianOperator",
    "LayerCurvatures",
    "TraceEstimate",
    "batch_hvp",
    "batch_hvps",
    "hessian_distance",
    "hessian_trace",
    "hessian_trace_per_layer",
    "layer_curvatures",
    "measure_layer_curvatures",
    "reference_layer_curvatures",
    "sample_curvatures",
    "top_eigenvalue",
]
