"""Derivative kernels on one batch: output JVPs, second directional derivatives, HVPs.

Notation (docs/measures.md §2): z = f(x; W) are the model outputs (logits), ℓ_j = loss(z_j, y_j) the
per-sample losses, v_i the direction of layer i and u_ij = J_i(x_j) v_i = d z_j(W_i + t v_i)/dt the
output tangent of sample j. The exact per-sample block form splits as

    v_iᵀ H_ii(x_j) v_i = u_ijᵀ ∇²_z ℓ_j u_ij  +  ∇_z ℓ_j · d²z_j(W_i + t v_i)/dt²,

the Gauss–Newton part plus a second-order output term that vanishes when the network is
piecewise linear in W_i (ReLU, eval-mode BatchNorm, pooling, linear ops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from trainables.hessian._conv import CONV_FUNCTIONS, fast_double_backward_conv
from trainables.hessian._model import LossFn, per_sample_losses

# Layer types whose output tangent is the layer's own linear map applied to v (u = op(a, v)).
_LINEAR_MAPS: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.Linear: "linear",
}


def supports_reverse_jvp(module: nn.Module, attribute: str) -> bool:
    """Whether :func:`reverse_output_jvps` can handle ``module.<attribute>`` (exact Conv/Linear weight)."""
    return type(module) in _LINEAR_MAPS and attribute == "weight"


def _weight_tangent(module: nn.Module, activation: Tensor, direction: Tensor) -> Tensor:
    """d/dt of ``module(activation)`` with weight W + t·direction (the bias carries no tangent)."""
    if _LINEAR_MAPS[type(module)] == "conv":
        return module._conv_forward(activation, direction, None)  # type: ignore[operator]
    return F.linear(activation, direction)


def output_quadratic_forms(loss_fn: LossFn, logits: Tensor, y: Tensor, tangents: Tensor) -> Tensor:
    """u_lᵀ ∇²_z ℓ_j u_l for every tangent l and sample j: ``tangents`` [L, B, ...] → [L, B].

    The per-sample output Hessian of an arbitrary (twice differentiable, per-sample) ``loss_fn`` is
    obtained by double backward through the loss alone, so no closed form is assumed. With L
    tangents and K outputs it takes min(L, K) tiny backward passes through the loss.
    """
    count, batch = tangents.shape[0], logits.shape[0]
    point = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = per_sample_losses(loss_fn, point, y)
        (slope,) = torch.autograd.grad(losses.sum(), point, create_graph=True)
    if not slope.requires_grad:  # loss linear in the outputs: zero output Hessian
        return tangents.new_zeros(count, batch)
    flat = tangents.reshape(count, batch, -1)
    outputs = flat.shape[-1]
    if count <= outputs:
        rows = [(flat[i] * _output_hvp(slope, point, tangents[i]).reshape(batch, -1)).sum(1) for i in range(count)]
        return torch.stack(rows)
    columns = []
    for k in range(outputs):
        unit = torch.zeros_like(point).reshape(batch, -1)
        unit[:, k] = 1
        columns.append(_output_hvp(slope, point, unit.reshape(point.shape)).reshape(batch, -1))
    hessians = torch.stack(columns, dim=-1)  # [B, K, K]: column k is H_j e_k
    return torch.einsum("lbk,bkm,lbm->lb", flat, hessians, flat)


def _output_hvp(slope: Tensor, point: Tensor, vector: Tensor) -> Tensor:
    (product,) = torch.autograd.grad(slope, point, grad_outputs=vector, retain_graph=True, allow_unused=True)
    return torch.zeros_like(point) if product is None else product


def reverse_output_jvps(
    model: nn.Module, x: Tensor, layers: Mapping[str, tuple[nn.Module, Tensor]]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample output tangents u_ij = J_i(x_j) v_i of many Conv/Linear layers in one forward.

    Each layer's output a_i W_iᵀ is replaced by a_i W_iᵀ + s_i ⊙ (a_i v_iᵀ) with a per-sample
    scale s_i = 0 (values unchanged), so ∂z_jk/∂s_ij = (J_i(x_j) v_i)_k. One backward pass per
    output k gives that column for all layers and samples at once: K backward passes replace L
    forward tangent passes (cheaper when K ≤ L). Needs samples that do not interact (eval mode).
    Layers whose output batch size differs from x's are omitted from the result.
    """
    batch = x.shape[0]
    scales = {name: torch.zeros(batch, device=x.device, dtype=x.dtype, requires_grad=True) for name in layers}
    skipped: set[str] = set()
    handles = [
        module.register_forward_hook(_injection_hook(name, direction, scales[name], skipped))
        for name, (module, direction) in layers.items()
    ]
    try:
        with torch.enable_grad():
            logits = model(x)
            used = [name for name in layers if name not in skipped]
            columns = _output_columns(logits.reshape(logits.shape[0], -1), [scales[name] for name in used])
    finally:
        for handle in handles:
            handle.remove()
    tangents = {
        name: torch.stack([column[i] for column in columns], -1).reshape(logits.shape) for i, name in enumerate(used)
    }
    return logits.detach(), tangents


def _injection_hook(name: str, direction: Tensor, scale: Tensor, skipped: set[str]) -> Callable[..., Tensor | None]:
    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if output.shape[0] != scale.shape[0]:
            skipped.add(name)
            return None
        with torch.no_grad():
            tangent = _weight_tangent(module, args[0], direction)
        return output + scale.view(-1, *([1] * (output.dim() - 1))) * tangent

    return hook


def _output_columns(flat: Tensor, scales: Sequence[Tensor]) -> list[list[Tensor]]:
    """columns[k][i] = ∂z_{·k}/∂s_i for outputs ``flat`` [B, K], one backward pass per output k."""
    count = flat.shape[1]
    columns = []
    for k in range(count):
        unit = torch.zeros_like(flat)
        unit[:, k] = 1
        grads = torch.autograd.grad(
            flat, list(scales), grad_outputs=unit, retain_graph=k < count - 1, allow_unused=True
        )
        columns.append([torch.zeros_like(s) if g is None else g for g, s in zip(grads, scales, strict=True)])
    return columns


class FrozenModel:
    """``model`` as a function of chosen weights, every other parameter detached (held fixed).

    Forward-mode derivatives run with grad mode *enabled* (some in-place ops, e.g. SiLU(inplace),
    have no second-order forward AD under ``no_grad``) yet record no backward graph, because no
    tensor involved requires grad.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {name: param.detach() for name, param in model.named_parameters()}

    def __call__(self, x: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
        return functional_call(self.model, {**self.params, **weights}, (x,))


def forward_output_jvp(frozen: FrozenModel, directions: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(z, u): outputs and their tangent along W + t·direction for the named weights (one pass)."""
    names = list(directions)

    def outputs(*values: Tensor) -> Tensor:
        return frozen(x, dict(zip(names, values, strict=True)))

    with torch.enable_grad(), autodiff_kernels():
        primals = tuple(frozen.params[n] for n in names)
        logits, tangent = jvp(outputs, primals, tuple(directions[n] for n in names))[:2]
    return logits, tangent


def nested_output_derivatives(frozen: FrozenModel, name: str, direction: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(dz/dt, d²z/dt²) along W_name + t·direction, by forward-over-forward."""

    def slope(w: Tensor) -> Tensor:
        return jvp(lambda u: frozen(x, {name: u}), (w,), (direction,))[1]

    with torch.enable_grad(), autodiff_kernels():
        first, second = jvp(slope, (frozen.params[name],), (direction,))[:2]
    return first, second


def nested_loss_curvature(
    frozen: FrozenModel, loss_fn: LossFn, name: str, direction: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    """Exact per-sample d²ℓ_j(W_name + t·v)/dt² = vᵀ H_ii(x_j) v, by forward-over-forward: [B]."""

    def losses(w: Tensor) -> Tensor:
        return per_sample_losses(loss_fn, frozen(x, {name: w}), y)

    def slope(w: Tensor) -> Tensor:
        return jvp(losses, (w,), (direction,))[1]

    with torch.enable_grad(), autodiff_kernels():
        return jvp(slope, (frozen.params[name],), (direction,))[1]


@contextlib.contextmanager
def autodiff_kernels(double_backward: bool = False) -> Iterator[None]:
    """Kernels that are fast and available under forward AD and double backward, same functions.

    - scaled_dot_product_attention goes to its math backend: the fused kernels have neither
      forward AD nor double backward (pytorch#117629, #116350);
    - eval-mode ``F.batch_norm`` is evaluated as x·scale + shift: its native forward-AD formula
      runs through slow decompositions (it dominated nested jvps on test_resnet);
    - ``F.hardsigmoid`` by its clamp formula (no forward AD for its native derivative);
    - with ``double_backward``, convolutions whose double backward uses convolution kernels
      (:mod:`._conv`; they have no forward AD, so only for double backward).
    """
    with sdpa_kernel([SDPBackend.MATH]), _AutodiffKernels(double_backward):
        yield


class _AutodiffKernels(TorchFunctionMode):
    """Evaluate inference-mode ``F.batch_norm`` (running statistics) as an affine map,
    ``F.hardsigmoid`` as clamp((x + 3)/6, 0, 1) and, with ``fast_conv``, ``F.conv{1,2,3}d`` through
    :func:`fast_double_backward_conv`: the same functions with fast, complete autodiff."""

    def __init__(self, fast_conv: bool) -> None:
        super().__init__()
        self.fast_conv = fast_conv

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.fast_conv and func in CONV_FUNCTIONS:
            result = fast_double_backward_conv(CONV_FUNCTIONS[func], args, kwargs)
            if result is not None:
                return result
        if func is F.batch_norm:
            bound = dict(zip(_BATCH_NORM_ARGS, args, strict=False)) | kwargs
            if not bound.get("training", False) and bound.get("running_mean") is not None:
                return _affine_batch_norm(**bound)
        if func is F.hardsigmoid:  # its native derivative has no forward AD
            return (args[0] + 3).clamp(0, 6) / 6
        return func(*args, **kwargs)


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _affine_batch_norm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> Tensor:
    """(x − μ)/√(σ² + ε)·γ + β for running statistics μ, σ², as x·scale + shift."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (input.dim() - 2)
    return input * scale.reshape(shape) + shift.reshape(shape)


def batch_hvp(
    model: nn.Module, loss_fn: LossFn, leaves: Mapping[str, Tensor], vector: Sequence[Tensor], x: Tensor, y: Tensor
) -> list[Tensor]:
    """H_b v for the batch-mean loss, w.r.t. the parameters ``leaves`` (others held fixed).

    Double backward: a create_graph gradient, then a second backward with
    grad_outputs = v. ``leaves`` are detached copies with requires_grad, so the model's own
    parameters, their ``requires_grad`` and ``.grad`` are never touched.
    """
    return batch_hvps(model, loss_fn, leaves, [vector], x, y)[0]


def batch_hvps(
    model: nn.Module,
    loss_fn: LossFn,
    leaves: Mapping[str, Tensor],
    vectors: Iterable[Sequence[Tensor]],
    x: Tensor,
    y: Tensor,
    reduce: Callable[[Sequence[Tensor], list[Tensor]], Any] | None = None,
) -> list[Any]:
    """[H_b v for v in vectors]: one forward and create_graph backward, then one second backward
    per vector on the retained graph. The first two passes are a third of a lone product's
    cost, so k products on one batch cost about (1 + 2k)/3 lone ones (``hessian_cost.py``).

    With ``reduce``, the list holds ``reduce(v, H_b v)`` instead of the products; ``vectors`` may
    be a lazy iterable. Then only one vector and its product are alive at a time: the memory of
    k products on a large model is that of one (``benchmarks/hessian_memory.py``)."""
    params = list(leaves.values())
    out = []
    with torch.enable_grad(), autodiff_kernels(double_backward=True):
        loss = per_sample_losses(loss_fn, functional_call(model, dict(leaves), (x,)), y).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        for vector in vectors:
            products: Sequence[Tensor | None] = [None] * len(params)
            if live:
                products = torch.autograd.grad(
                    [grads[i] for i in live],
                    params,
                    grad_outputs=[vector[i] for i in live],
                    allow_unused=True,
                    retain_graph=True,  # freed with ``grads`` on return
                )
            result = [torch.zeros_like(v) if p is None else p for v, p in zip(vector, products, strict=True)]
            out.append(result if reduce is None else reduce(vector, result))
    return out
