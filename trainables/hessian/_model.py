"""Model and data plumbing shared by every Hessian measure.

Everything here is about *which* tensors a measure looks at and *where* they live: evaluation
mode with exact restoration, the device and dtype of the model, batches moved there, parameter
and layer selection with validation, and the fine-tuning directions v_i = W_i − W_i⁽⁰⁾.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

# Modules whose ``weight`` is a "layer" of the Ju et al. measure by default.
LAYER_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; restore every submodule's own ``training`` flag afterwards.

    Eval mode is part of the measures' definition: BatchNorm uses running statistics (so samples
    do not interact and per-sample Hessians exist) and dropout is off (docs/measures.md §1).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first floating parameter."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    raise ValueError("model has no floating-point parameters: there is no Hessian to measure")


@dataclass(frozen=True)
class BatchSource:
    """Re-iterable batches of ``data`` moved to the model's device (and its dtype for floats).

    A one-shot iterator is materialised once so that estimators that pass over the data several
    times (Lanczos, cycling Hutchinson) see the same batches every time.
    """

    data: Iterable[Batch]
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, data: Iterable[Batch], model: nn.Module, *, reiterable: bool) -> BatchSource:
        """Wrap ``data`` for ``model``; ``reiterable`` materialises one-shot iterators."""
        if reiterable and iter(data) is data:
            data = list(data)
        device, dtype = model_device_dtype(model)
        return cls(data, device, dtype)

    def __iter__(self) -> Iterator[Batch]:
        empty = True
        for batch in self.data:
            empty = False
            yield self._prepare(batch)
        if empty:
            raise ValueError("data yielded no batches: pass a non-empty iterable of (x, y) batches")

    def _prepare(self, batch: Batch) -> Batch:
        try:
            x, y = batch
        except (TypeError, ValueError) as error:
            raise ValueError(f"each batch must be a pair (x, y); got {type(batch).__name__}") from error
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
            raise ValueError("each batch must be a pair of tensors (x, y)")
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"batch with x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}: "
                "both need the same non-zero batch size in dimension 0"
            )
        return self._move(x), self._move(y)

    def _move(self, tensor: Tensor) -> Tensor:
        if tensor.is_floating_point():
            return tensor.to(device=self.device, dtype=self.dtype)
        return tensor.to(device=self.device)


def per_sample_losses(loss_fn: LossFn, logits: Tensor, y: Tensor) -> Tensor:
    """``loss_fn(logits, y)``, checked to be one loss per sample (shape ``[B]``)."""
    losses = loss_fn(logits, y)
    if not isinstance(losses, Tensor) or losses.shape != (logits.shape[0],):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-sample losses of shape [{logits.shape[0]}], got {shape}; use reduction='none'"
        )
    return losses


def default_layers(model: nn.Module) -> list[str]:
    """Names of the weights (dim ≥ 2) of the model's Conv1d/2d/3d and Linear modules.

    A weight tied into several modules is listed once, under its ``named_parameters()`` name.
    """
    registered = {id(param): name for name, param in model.named_parameters()}
    names = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, LAYER_MODULES) and isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            names.append(registered[id(weight)])
    return list(dict.fromkeys(names))


def resolve_names(model: nn.Module, names: Sequence[str] | None, *, what: str = "layers") -> list[str]:
    """Validate explicit parameter names (any parameter may be named); ``None`` means the default."""
    if names is None:
        chosen = default_layers(model)
        if not chosen:
            raise ValueError(f"model has no Conv/Linear weights to measure; pass {what}=[parameter names]")
        return chosen
    if isinstance(names, str):
        raise ValueError(
            f"{what} must be a sequence of parameter names, not the string {names!r}; use {what}=[{names!r}]"
        )
    available = dict(model.named_parameters())
    unknown = [name for name in names if name not in available]
    if unknown:
        listing = ", ".join(list(available)[:8]) + (", ..." if len(available) > 8 else "")
        raise ValueError(
            f"unknown parameter name(s) in {what}: {unknown}; use model.named_parameters() names such as: {listing}"
        )
    chosen = list(dict.fromkeys(names))
    if not chosen:
        raise ValueError(f"{what} is empty; pass at least one parameter name (or None for the default)")
    return chosen


def directions(model: nn.Module, layers: Sequence[str], reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """v_i = W_i − reference[W_i] for every layer, detached, on the model's device and dtype."""
    params = dict(model.named_parameters())
    result = {}
    for name in layers:
        if name not in reference:
            raise ValueError(
                f"reference has no entry for layer {name!r}; "
                "pass the weights at the start of fine-tuning for every measured layer"
            )
        start = reference[name]
        weight = params[name].detach()
        if tuple(start.shape) != tuple(weight.shape):
            raise ValueError(
                f"reference[{name!r}] has shape {tuple(start.shape)}, the parameter has "
                f"{tuple(weight.shape)}; pass the same layer's starting weights"
            )
        result[name] = weight - start.detach().to(device=weight.device, dtype=weight.dtype)
    return result


def trainable_names(model: nn.Module, params: Sequence[str] | None) -> list[str]:
    """Parameters of the trace/eigenvalue Hessian: ``params`` or all with ``requires_grad``."""
    if params is not None:
        return resolve_names(model, params, what="params")
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if not names:
        raise ValueError("model has no parameters with requires_grad=True; pass params=[names] explicitly")
    return names


def is_shared(model: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` is registered under more than one name (tied weights)."""
    target = dict(model.named_parameters())[name]
    return sum(param is target for _, param in model.named_parameters(remove_duplicate=False)) > 1


def owning_module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that registers parameter ``name`` and the attribute name within it."""
    module_name, _, attribute = name.rpartition(".")
    return model.get_submodule(module_name), attribute
