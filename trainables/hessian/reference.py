"""The quantity the Ju et al. paper code computes, kept only to reproduce published numbers.

VirtuosoResearch/Robust-Fine-Tuning (``compute_hessians_quantity``, docs/measures.md §3) does, per
mini-batch of (typically 4) samples: one gradient with create_graph of the batch-mean loss w.r.t.
the layer weights, ONE second backward with the concatenated direction v = (v_1, …, v_L), and per
layer ⟨v_i, (H v)_i⟩ = v_iᵀH_ii v_i + Σ_{j≠i} v_iᵀH_ij v_j; then the max over mini-batches, with no
positive-part truncation. That includes cross-layer curvature (it can be negative, and it sums to
vᵀHv, not to Σ_i v_iᵀH_ii v_i) and averages within a batch: it is NOT the theorem's per-sample
block form, which :func:`trainables.hessian.layer_curvatures` computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from trainables.hessian._model import (
    Batch,
    BatchSource,
    LossFn,
    directions,
    evaluation_mode,
    resolve_names,
)
from trainables.hessian.operator import HessianOperator

__all__ = ["reference_layer_curvatures"]


def reference_layer_curvatures(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    reference: Mapping[str, Tensor],
    *,
    layers: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """max over mini-batches b of ⟨v_i, (H_b v)_i⟩ per layer, as in the Ju et al. paper code.

    H_b is the Hessian of the batch-mean loss w.r.t. the measured layers' weights only (other
    parameters fixed), v the concatenated fine-tuning direction. Batches are ``data``'s, or each
    split into chunks of ``batch_size`` (the paper's README uses 4). No truncation at 0.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int or None")
    names = resolve_names(model, layers)
    vector = directions(model, names, reference)
    peaks: dict[str, float] = {}
    with evaluation_mode(model):
        operator = HessianOperator(model, loss_fn, names)
        for x, y in _chunks(BatchSource.of(data, model, reiterable=False), batch_size):
            product = operator.batch_product(list(vector.values()), x, y)
            for name, hv in zip(names, product, strict=True):
                value = float((vector[name] * hv).sum())
                peaks[name] = max(peaks.get(name, value), value)
    return peaks


def _chunks(batches: Iterable[Batch], size: int | None) -> Iterator[Batch]:
    for x, y in batches:
        if size is None:
            yield x, y
        else:
            yield from zip(x.split(size), y.split(size), strict=True)
