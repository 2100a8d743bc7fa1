"""When is the Gauss–Newton shortcut exact? A structural and a numerical test.

The block form v_iᵀH_ii(x_j)v_i equals its Gauss–Newton part u_ijᵀ∇²_zℓ_j u_ij exactly when the
outputs are piecewise linear in W_i, i.e. d²z/dt² = 0 along W_i + t v_i (hessian.md §3.4, SPEC §4).
Module types cannot prove that on their own (``forward`` code may apply F.gelu, x·sigmoid(x), …),
and a numerical test on a few samples cannot prove it for every sample. So the shortcut is used
only when both agree:

1. structural: every leaf module of the model is of a type from a piecewise-linear allow-list
   (exact type match, BatchNorm only with running statistics, which eval mode uses);
2. numerical, per layer: forward-over-forward d²z/dt² on a few samples of the first batch is
   exactly zero (piecewise-linear ops propagate exact zeros; any smooth op makes it non-zero).
"""

from __future__ import annotations

from torch import nn

_PIECEWISE_LINEAR_LEAVES: frozenset[type[nn.Module]] = frozenset({
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
})
_BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# timm leaves that are linear in their input (named, so that timm need not be imported here).
_TIMM_PIECEWISE_LINEAR: frozenset[str] = frozenset({
    "timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgPool",
    "timm.layers.adaptive_avgmax_pool.FastAdaptiveMaxPool",
    "timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgMaxPool",
})


def _is_piecewise_linear_leaf(module: nn.Module) -> bool:
    kind = type(module)
    if kind in _BATCH_NORMS:
        return getattr(module, "running_mean", None) is not None
    qualified = f"{kind.__module__}.{kind.__qualname__}"
    return kind in _PIECEWISE_LINEAR_LEAVES or qualified in _TIMM_PIECEWISE_LINEAR


def structurally_piecewise_linear(model: nn.Module) -> bool:
    """Whether every leaf module (no children) is piecewise linear in its input and parameters.

    Containers are transparent here; operations inside their ``forward`` are caught by the
    numerical per-layer test (:func:`trainables.hessian._derivatives.nested_output_derivatives`).
    """
    return all(_is_piecewise_linear_leaf(module) for module in model.modules()
               if next(module.children(), None) is None)
