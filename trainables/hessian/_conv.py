"""Convolution with a double backward built from convolution kernels, for HVPs by double backward.

PyTorch's double backward of a convolution (``_convolution_double_backward``) computes its two
cross terms as convolutions with the batch and channel axes swapped, whose kernels are as large
as the feature map: on CPU they took about half of an HVP's time on ``test_resnet``. Each cross
term is the input or weight gradient of a plain convolution, which ``convolution_backward``
computes with its fast kernels. With (ĝI, ĝW) the incoming gradients of the first backward's
outputs (gI, gW) and gO that backward's incoming gradient:

    ĝO = conv(ĝI, W) + conv(I, ĝW)
    ∂/∂I = ∂/∂I ⟨gO, conv(I, ĝW)⟩ = convolution_backward(gO, I, ĝW)[input]
    ∂/∂W = ∂/∂W ⟨gO, conv(ĝI, W)⟩ = convolution_backward(gO, ĝI, W)[weight]

Same function, same derivatives: only the kernels change. Third derivatives are not supported.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["CONV_FUNCTIONS", "fast_double_backward_conv"]

CONV_FUNCTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}  # F.convNd is torch.convNd
_aten = torch.ops.aten


class _Geometry(NamedTuple):
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int

    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return _aten.convolution(
            input, weight, bias, self.stride, self.padding, self.dilation, False, [0] * len(self.stride), self.groups
        )

    def backward(
        self, grad_out: Tensor, input: Tensor, weight: Tensor, mask: list[bool]
    ) -> tuple[Tensor | None, Tensor | None]:
        grad_input, grad_weight, _ = _aten.convolution_backward(
            grad_out,
            input,
            weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            self.groups,
            [*mask, False],
        )
        return grad_input, grad_weight


def fast_double_backward_conv(dims: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """``torch.conv{dims}d(*args, **kwargs)`` through :class:`_Convolution`, or None where the call is not
    covered (string padding such as ``'same'``): the caller then runs the native op."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args, strict=False)) | kwargs
    padding = bound.get("padding", 0)
    if isinstance(padding, str):
        return None
    geometry = _Geometry(
        _expand(bound.get("stride", 1), dims),
        _expand(padding, dims),
        _expand(bound.get("dilation", 1), dims),
        int(bound.get("groups", 1)),
    )
    result: Tensor = _Convolution.apply(bound["input"], bound["weight"], bound.get("bias"), geometry)
    return result


def _expand(value: int | tuple[int, ...] | list[int], dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]


class _Convolution(torch.autograd.Function):
    """conv(I, W) + b whose backward is :class:`_ConvolutionGradients` (differentiable once more)."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, geometry: _Geometry) -> Tensor:
        ctx.save_for_backward(input, weight)
        ctx.geometry = geometry
        return geometry.conv(input, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if need_input or need_weight:
            grad_input, grad_weight = _ConvolutionGradients.apply(
                grad_out, input, weight, ctx.geometry, need_input, need_weight
            )
        if need_bias:
            grad_bias = grad_out.sum([d for d in range(grad_out.dim()) if d != 1])
        return grad_input, grad_weight, grad_bias, None  # the mask left unneeded gradients None


class _ConvolutionGradients(torch.autograd.Function):
    """(gI, gW) = convolution_backward(gO, I, W), with the double backward of the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        grad_out: Tensor,
        input: Tensor,
        weight: Tensor,
        geometry: _Geometry,
        need_input: bool,
        need_weight: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        ctx.save_for_backward(grad_out, input, weight)
        ctx.geometry = geometry
        ctx.set_materialize_grads(False)
        return geometry.backward(grad_out, input, weight, [need_input, need_weight])

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_grad_input: Tensor | None, grad_grad_weight: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad_out, input, weight = ctx.saved_tensors
        geometry: _Geometry = ctx.geometry
        need_grad_out, need_input, need_weight = ctx.needs_input_grad[:3]
        new_grad_out = new_input = new_weight = None
        if need_grad_out:
            terms = [
                geometry.conv(a, b)
                for a, b in ((grad_grad_input, weight), (input, grad_grad_weight))
                if a is not None and b is not None
            ]
            new_grad_out = sum(terms[1:], terms[0]) if terms else None
        if need_input and grad_grad_weight is not None:
            new_input = geometry.backward(grad_out, input, grad_grad_weight, [True, False])[0]
        if need_weight and grad_grad_input is not None:
            new_weight = geometry.backward(grad_out, grad_grad_input, weight, [False, True])[1]
        return new_grad_out, new_input, new_weight, None, None, None
