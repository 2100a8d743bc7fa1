"""When is the Gauss–Newton shortcut exact? A linearity proof on the autograd graph.

The block form v_iᵀH_ii(x_j)v_i equals its Gauss–Newton part u_ijᵀ∇²_zℓ_j u_ij exactly when the
outputs z are piecewise linear in W_i alone, i.e. d²z/dt² = 0 along W_i + t v_i (docs/measures.md
§2). Module types cannot show that (``forward`` code may call F.gelu, x·sigmoid(x), …), and a
numerical test on a few samples cannot prove it for all samples. Instead we record one forward
pass with every measured weight as its own leaf and walk the autograd graph: each node's op type
is looked up in an allow-list of ops that are

- *linear*: piecewise linear jointly in all their inputs (sums, views, concatenation, pooling,
  ReLU/LeakyReLU/hardtanh/clamp, max/min/where, eval-mode-free ops), or
- *bilinear*: linear in each operand separately (convolution, matmul, mul, eval-mode BatchNorm in
  (input, weight)); z stays piecewise linear in W_i unless two operands both depend on W_i, or
- a division, which is linear in its numerator only.

Any other op that depends on W_i (tanh, GELU, softmax, LayerNorm, train-mode BatchNorm, in-place
writes into views, unknown ops) makes layer i non-linear, as does a bilinear op with W_i on both
sides. The verdict holds for the recorded graph, i.e. for every input that takes the same code
path (data-dependent control flow in ``forward`` is the one thing it cannot see).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

# the op tables read better packed than one name a line
# fmt: off
_LINEAR_OPS: frozenset[str] = frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1",
    "NegBackward0", "MulBackward1", "DivBackward1", "SumBackward0", "SumBackward1", "MeanBackward0",
    "MeanBackward1", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AsStridedBackward0",
    "AsStridedBackward1", "PermuteBackward0", "TransposeBackward0", "TransposeBackward1", "TBackward0",
    "ExpandBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3",
    "SqueezeBackward4", "UnsqueezeBackward0", "UnsqueezeBackward1", "SelectBackward0", "SliceBackward0",
    "CatBackward0", "StackBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0",
    "IndexBackward0", "IndexSelectBackward0", "GatherBackward0", "CloneBackward0", "ToCopyBackward0",
    "AliasBackward0", "RepeatBackward0", "FlipBackward0", "RollBackward0", "ConstantPadNdBackward0",
    "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0",
    "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "ReplicationPad3DBackward0",
    "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0", "UpsampleNearest3DBackward0",
    "UpsampleBilinear2DBackward0", "PixelShuffleBackward0", "PixelUnshuffleBackward0",
    "AvgPool2DBackward0", "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0",
    "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0",
    "AdaptiveMaxPool3DBackward0", "ReluBackward0", "ReluBackward1", "ThresholdBackward0",
    "ThresholdBackward1", "LeakyReluBackward0", "LeakyReluBackward1", "HardtanhBackward0",
    "HardtanhBackward1", "HardsigmoidBackward0", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0",
    "AbsBackward0",
    "MaximumBackward0", "MinimumBackward0", "MaxBackward0", "MaxBackward1", "MinBackward0", "MinBackward1",
    "AmaxBackward0", "AminBackward0", "WhereBackward0", "MaskedFillBackward0", "EmbeddingBackward0",
})
# op → positions (in next_functions) of the operands it is separately linear in
_BILINEAR_OPS: Mapping[str, tuple[int, int]] = {
    "ConvolutionBackward0": (0, 1), "AddmmBackward0": (1, 2), "MmBackward0": (0, 1), "BmmBackward0": (0, 1),
    "MvBackward0": (0, 1), "DotBackward0": (0, 1), "MulBackward0": (0, 1), "LinearBackward0": (0, 1),
    "BaddbmmBackward0": (1, 2), "AddmvBackward0": (1, 2), "PreluKernelBackward0": (0, 1),
    "NativeBatchNormBackward0": (0, 1), "CudnnBatchNormBackward0": (0, 1), "MiopenBatchNormBackward0": (0, 1),
    "NativeBatchNormLegitNoTrainingBackward0": (0, 1),
}
_DIVISION_OPS: frozenset[str] = frozenset({"DivBackward0"})
# fmt: on


def piecewise_linear_layers(model: nn.Module, weights: Mapping[str, Tensor], x: Tensor) -> set[str]:
    """Names of the layers in ``weights`` in which the model's outputs on ``x`` are piecewise linear."""
    leaves = {name: weight.detach().requires_grad_(True) for name, weight in weights.items()}
    with torch.enable_grad():
        outputs = functional_call(model, leaves, (x,))
    if outputs.grad_fn is None:
        return set(weights)  # the outputs depend on none of the layers
    indices = {id(leaf): i for i, leaf in enumerate(leaves.values())}
    nonlinear = _nonlinear_leaves(outputs.grad_fn, indices)
    return {name for i, name in enumerate(leaves) if i not in nonlinear}


def _nonlinear_leaves(root: torch.autograd.graph.Node, indices: Mapping[int, int]) -> set[int]:
    """Walk the graph once (iteratively, post-order) propagating which leaves each node depends on."""
    depends: dict[torch.autograd.graph.Node, frozenset[int]] = {}
    nonlinear: set[int] = set()
    stack: list[tuple[torch.autograd.graph.Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in depends:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in depends)
            continue
        operands = [frozenset() if child is None else depends[child] for child, _ in node.next_functions]
        depends[node] = frozenset().union(*operands) | _leaf_of(node, indices)
        nonlinear |= _violations(node, operands)
    return nonlinear


def _leaf_of(node: torch.autograd.graph.Node, indices: Mapping[int, int]) -> frozenset[int]:
    variable = getattr(node, "variable", None)
    if variable is None or id(variable) not in indices:
        return frozenset()
    return frozenset({indices[id(variable)]})


def _violations(node: torch.autograd.graph.Node, operands: list[frozenset[int]]) -> set[int]:
    """Leaves in which ``node`` is not (piecewise) linear, given each operand's dependencies."""
    kind = type(node).__name__
    everything = set().union(*operands)
    if kind == "AccumulateGrad" or kind in _LINEAR_OPS or not everything:
        return set()
    if kind in _DIVISION_OPS:
        return set(operands[1]) if len(operands) > 1 else set()
    if kind in _BILINEAR_OPS and not getattr(node, "_saved_training", False):
        first, second = _BILINEAR_OPS[kind]
        if len(operands) <= max(first, second):
            return set()
        return set(operands[first] & operands[second])
    return everything
