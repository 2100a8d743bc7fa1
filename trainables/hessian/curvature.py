"""Per-layer curvature along the fine-tuning direction and the Hessian distance measure.

Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based Generalization
Guarantees", ICML 2022: for layer i with fine-tuning direction v_i = W_i − W_i⁽⁰⁾ and sample j,

    q_ij = v_iᵀ H_ii(x_j, y_j) v_i,        H_i = max_j max(q_ij, 0),        M = Σ_i √H_i / √n,

where H_ii is the diagonal block of the per-sample loss Hessian for the weight tensor W_i alone
(other parameters fixed). The q_ij are exact (no cross-layer terms; see ``reference.py`` for the
paper code's different quantity) and computed per sample in eval mode (docs/measures.md §1–3).

How (``method``):

- ``"nested"``: forward-over-forward second directional derivative of the per-sample losses,
  tangent on W_i only (``torch.func.jvp`` twice). Exact for any model and any loss_fn.
- ``"ggn"``: Gauss–Newton part u_ijᵀ ∇²_z ℓ_j u_ij with u_ij = J_i(x_j) v_i (one JVP, or for all
  Conv/Linear layers at once K backward passes, see ``reverse_output_jvps``) and the per-sample
  output Hessian of ``loss_fn`` from autograd (no closed form assumed). Exact iff the outputs are
  piecewise linear in W_i; otherwise a PSD surrogate.
- ``"auto"`` (default): ``"ggn"`` for the layers in which the outputs are proved piecewise linear
  by an analysis of the autograd graph of the first batch (``_exactness.py``; it sees functional
  ops in ``forward`` code too), with a numerical spot check (d²z/dt² exactly 0), ``"nested"`` for
  every other layer. The result is exact in both cases: e.g. on a ReLU/eval-BN ResNet every layer
  takes the shortcut, on a GELU MLP only the head (linear in its own weight) does.

Cost (docs/measures.md §7): nested ≈ 2 forward-mode passes per layer over the layer's suffix; the GGN
shortcut for Conv/Linear weights costs one forward plus K backward passes (K outputs) for all
layers together, which is below the (1 + L)/3-epoch floor of the nested form when K ≲ L. The
loop is per batch, so memory stays that of one batch's forward and backward (larger batches
amortise per-op overhead).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from trainables.hessian._derivatives import (
    FrozenModel,
    forward_output_jvp,
    nested_loss_curvature,
    nested_output_derivatives,
    output_quadratic_forms,
    reverse_output_jvps,
    supports_reverse_jvp,
)
from trainables.hessian._exactness import piecewise_linear_layers
from trainables.hessian._model import (
    Batch,
    BatchSource,
    LossFn,
    directions,
    evaluation_mode,
    is_shared,
    owning_module,
    resolve_names,
)

__all__ = ["LayerCurvatures", "hessian_distance", "layer_curvatures", "measure_layer_curvatures", "sample_curvatures"]

Method = Literal["auto", "nested", "ggn"]
_METHODS = ("auto", "nested", "ggn")
_REDUCES = ("max", "mean")
_CHECK_SAMPLES = 2  # samples of the first batch used to choose and cross-check the fast paths


@dataclass(frozen=True)
class LayerCurvatures:
    """Both aggregations of q_ij over the sample set S, from one pass.

    ``max[i]`` = max_j max(q_ij, 0) (the theorem's H_i), ``mean[i]`` = mean_j q_ij (no clipping),
    ``n_samples`` = |S| (part of the measure's definition: a max cannot be subsampled),
    ``methods[i]`` = how layer i was computed (``"ggn"`` or ``"nested"``, both exact under
    ``method="auto"``).
    """

    max: dict[str, float]
    mean: dict[str, float]
    n_samples: int
    methods: dict[str, str]


@dataclass(frozen=True)
class _Plan:
    """How each layer is computed: GGN via K reverse passes, GGN via a forward JVP, or nested."""

    reverse: tuple[str, ...]
    forward: tuple[str, ...]
    nested: tuple[str, ...]

    def methods(self) -> dict[str, str]:
        return {**dict.fromkeys(self.reverse + self.forward, "ggn"), **dict.fromkeys(self.nested, "nested")}


class _Layers:
    """The measured weight tensors of one model: names, current values, directions, modules."""

    def __init__(self, model: nn.Module, names: Sequence[str], reference: Mapping[str, Tensor]) -> None:
        self.model = model
        self.frozen = FrozenModel(model)
        self.names = list(names)
        self.weights = {name: self.frozen.params[name] for name in self.names}
        self.directions = directions(model, self.names, reference)

    def reverse_capable(self) -> list[str]:
        capable = []
        for name in self.names:
            module, attribute = owning_module(self.model, name)
            if supports_reverse_jvp(module, attribute) and not is_shared(self.model, name):
                capable.append(name)
        return capable

    def modules(self, names: Iterable[str]) -> dict[str, tuple[nn.Module, Tensor]]:
        return {name: (owning_module(self.model, name)[0], self.directions[name]) for name in names}


def measure_layer_curvatures(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    reference: Mapping[str, Tensor],
    *,
    layers: Sequence[str] | None = None,
    method: Method = "auto",
) -> LayerCurvatures:
    """Exact per-sample q_ij = v_iᵀ H_ii(x_j) v_i for every layer and sample, aggregated.

    ``loss_fn(logits, y)`` returns per-sample losses [B] (each depending on its own sample only);
    ``data`` yields (x, y) batches and is passed over once, batch by batch; ``reference`` maps each
    layer name to its weights at the start of fine-tuning; ``layers`` are any
    ``model.named_parameters()`` names (default: weights of Conv1d/2d/3d and Linear modules).
    ``method``: see the module docstring. Runs in eval mode; every module's mode is restored.
    """
    names = resolve_names(model, layers)
    total = torch.zeros(len(names), dtype=torch.float64)
    peak = torch.zeros(len(names), dtype=torch.float64)
    count = 0
    methods: dict[str, str] = {}
    for values, batch_methods in _curvature_batches(model, loss_fn, data, reference, names, method):
        methods = batch_methods
        total += values.sum(1)
        peak = torch.maximum(peak, values.max(1).values.clamp(min=0))
        count += values.shape[1]
    return LayerCurvatures(
        max=dict(zip(names, peak.tolist(), strict=True)),
        mean=dict(zip(names, (total / count).tolist(), strict=True)),
        n_samples=count,
        methods=methods,
    )


def sample_curvatures(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    reference: Mapping[str, Tensor],
    *,
    layers: Sequence[str] | None = None,
    method: Method = "auto",
) -> tuple[list[str], Tensor]:
    """(layer names, q) with q[i, j] = v_iᵀ H_ii(x_j) v_i for every sample j of ``data``, in order.

    The per-sample values behind :func:`measure_layer_curvatures` (float64, CPU, [L, S]), for
    other aggregations (quantiles, subsets of samples). Arguments as there.
    """
    names = resolve_names(model, layers)
    chunks = [values for values, _ in _curvature_batches(model, loss_fn, data, reference, names, method)]
    return names, torch.cat(chunks, dim=1)


def _curvature_batches(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    reference: Mapping[str, Tensor],
    names: Sequence[str],
    method: Method,
) -> Iterator[tuple[Tensor, dict[str, str]]]:
    """Per batch: q [L, B] (float64, CPU) and how each layer is computed; eval mode throughout."""
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {_METHODS}")
    chosen = _Layers(model, names, reference)
    batches = BatchSource.of(data, model, reiterable=False)
    plan: _Plan | None = None
    with evaluation_mode(model), torch.no_grad():
        for x, y in batches:
            plan = plan or _make_plan(chosen, x, method)
            yield _batch_curvatures(chosen, plan, loss_fn, x, y).to("cpu", torch.float64), plan.methods()


def layer_curvatures(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    reference: Mapping[str, Tensor],
    *,
    layers: Sequence[str] | None = None,
    reduce: str = "max",
    method: Method = "auto",
) -> dict[str, float]:
    """Per-layer H_i: ``reduce="max"``: max_j max(q_ij, 0); ``"mean"``: mean_j q_ij (unclipped).

    q_ij = v_iᵀ H_ii(x_j, y_j) v_i exactly (Ju et al. ICML 2022; see
    :func:`measure_layer_curvatures` for arguments and ``method``). Keys are parameter names.
    """
    if reduce not in _REDUCES:
        raise ValueError(f"reduce={reduce!r} is unknown; use 'max' or 'mean'")
    result = measure_layer_curvatures(model, loss_fn, data, reference, layers=layers, method=method)
    return result.max if reduce == "max" else result.mean


def hessian_distance(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    reference: Mapping[str, Tensor],
    *,
    n: int,
    layers: Sequence[str] | None = None,
    method: Method = "auto",
) -> float:
    """The Hessian distance measure M = Σ_i √H_i / √n (Ju et al. ICML 2022; docs/measures.md §1).

    H_i = max_j max(q_ij, 0) over the samples of ``data`` (:func:`layer_curvatures` with
    ``reduce="max"``); ``n`` is the number of training samples of the bound.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int: the number of training samples")
    peaks = layer_curvatures(model, loss_fn, data, reference, layers=layers, reduce="max", method=method)
    return sum(math.sqrt(h) for h in peaks.values()) / math.sqrt(n)


def _make_plan(layers: _Layers, x: Tensor, method: Method) -> _Plan:
    if method == "nested":
        return _Plan((), (), tuple(layers.names))
    sample = x[:_CHECK_SAMPLES]
    exact = _exact_ggn_layers(layers, sample) if method == "auto" else set(layers.names)
    ggn = [name for name in layers.names if name in exact]
    nested = tuple(name for name in layers.names if name not in exact)
    reverse = _reverse_layers(layers, ggn, sample)
    forward = tuple(name for name in ggn if name not in reverse)
    return _Plan(reverse, forward, nested)


def _exact_ggn_layers(layers: _Layers, sample: Tensor) -> set[str]:
    """Layers in which the outputs are provably piecewise linear (``_exactness``).

    A cheap numerical spot check backs the graph analysis: for the first such layer (usually the
    one with the longest suffix), forward-over-forward d²z/dt² on the check samples must be exactly 0,
    as piecewise-linear ops propagate exact zeros; otherwise no layer takes the shortcut.
    """
    exact = piecewise_linear_layers(layers.model, layers.weights, sample)
    first = next((name for name in layers.names if name in exact), None)
    if first is not None:
        _, second = nested_output_derivatives(layers.frozen, first, layers.directions[first], sample)
        if torch.count_nonzero(second) > 0:
            warnings.warn(
                f"linearity analysis marked {first!r} piecewise linear but d²z/dt² ≠ 0; "
                "computing every layer by nested forward mode",
                RuntimeWarning,
                stacklevel=4,
            )
            return set()
    return exact


def _reverse_layers(layers: _Layers, ggn: Sequence[str], sample: Tensor) -> tuple[str, ...]:
    """GGN layers served by K reverse passes: Conv/Linear weights, when K ≤ their count.

    The reverse tangents are cross-checked on ``sample`` against one forward-mode JVP along a
    random combination Σ_i c_i v_i of all their directions (catching hooks that did not fire, weights
    also used outside their module, samples that interact); on disagreement all of them fall back
    to per-layer forward JVPs.
    """
    capable = [name for name in layers.reverse_capable() if name in ggn]
    if not capable:
        return ()
    logits, tangents = reverse_output_jvps(layers.model, sample, layers.modules(capable))
    if logits[0].numel() > len(capable) or set(tangents) != set(capable):
        return ()
    weights = _check_weights([tangents[name] for name in capable])
    combined = {name: c * layers.directions[name] for name, c in zip(capable, weights, strict=True)}
    _, expected = forward_output_jvp(layers.frozen, combined, sample)
    actual = sum(c * tangents[name] for name, c in zip(capable, weights, strict=True))
    return tuple(capable) if _close(torch.as_tensor(actual), expected) else ()


def _check_weights(tangents: Sequence[Tensor]) -> list[float]:
    """Seeded random c_i / ‖u_i‖, so that every layer weighs O(1) in the combined check.

    A layer whose reverse tangent came out zero gets a huge weight instead, so that a hook that
    never fired cannot hide behind larger layers.
    """
    norms = torch.stack([t.detach().double().norm() for t in tangents]).cpu()
    floor = float(norms.max()) * torch.finfo(tangents[0].dtype).eps if float(norms.max()) > 0 else 1.0
    signs = torch.randn(len(tangents), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (signs / norms.clamp(min=floor)).tolist()


def _close(actual: Tensor, expected: Tensor) -> bool:
    tolerance = math.sqrt(torch.finfo(expected.dtype).eps)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * scale))


def _batch_curvatures(layers: _Layers, plan: _Plan, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    """q_ij for one batch: [L, B] in layer order."""
    values: dict[str, Tensor] = {}
    tangents: dict[str, Tensor] = {}
    logits: Tensor | None = None
    if plan.reverse:
        logits, tangents = reverse_output_jvps(layers.model, x, layers.modules(plan.reverse))
    for name in plan.forward + tuple(n for n in plan.reverse if n not in tangents):
        logits, tangents[name] = forward_output_jvp(layers.frozen, {name: layers.directions[name]}, x)
    if tangents:
        assert logits is not None
        order = list(tangents)
        forms = output_quadratic_forms(loss_fn, logits, y, torch.stack([tangents[n] for n in order]))
        values.update(zip(order, forms, strict=True))
    for name in plan.nested:
        values[name] = nested_loss_curvature(layers.frozen, loss_fn, name, layers.directions[name], x, y)
    return torch.stack([values[name] for name in layers.names])
