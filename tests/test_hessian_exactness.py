"""Which layers may use the Gauss–Newton shortcut: the autograd-graph linearity analysis."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainables.hessian import hessian_trace, measure_layer_curvatures, top_eigenvalue
from trainables.hessian._exactness import piecewise_linear_layers

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DTYPE = torch.float64


def cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z, y, reduction="none")


class Gated(nn.Module):
    """Squeeze-excitation-like gating x·σ(Wx): smooth, and W_in appears on both sides of a product."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.gate = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inner(x))
        return self.head(h * torch.sigmoid(self.gate(h)))


class Twice(nn.Module):
    """The same Linear applied twice: outputs are quadratic in its weight although all ops are linear."""

    def __init__(self) -> None:
        super().__init__()
        self.square = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.square(torch.relu(self.square(x)))))


class Tied(nn.Module):
    """One Parameter registered in two Linear modules (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


class Attention(nn.Module):
    """One head of scaled dot-product attention over 3 tokens, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x.view(x.shape[0], 3, 4)).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v).mean(1))


def batches(features: int = 4, sizes: tuple[int, ...] = (4, 3)) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(b, features, generator=generator, dtype=DTYPE), torch.randint(0, 3, (b,), generator=generator))
        for b in sizes
    ]


def reference_of(model: nn.Module) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        n: p.detach() - 0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def dense_blocks(
    model: nn.Module, data: list[tuple[Tensor, Tensor]], reference: dict[str, Tensor], name: str
) -> Tensor:
    weight = dict(model.named_parameters())[name].detach()
    v = (weight - reference[name]).reshape(-1)
    values = []
    for x, y in data:
        for j in range(x.shape[0]):

            def loss(w: Tensor, j: int = j, x: Tensor = x, y: Tensor = y) -> Tensor:
                logits = functional_call(model, {name: w.view(weight.shape)}, (x[j : j + 1],))
                return cross_entropy(logits, y[j : j + 1]).sum()

            with sdpa_kernel([SDPBackend.MATH]):
                block = torch.autograd.functional.hessian(loss, weight.reshape(-1))
            values.append(v @ block @ v)
    return torch.stack(values)


@pytest.mark.parametrize(
    "make, expected",
    [
        (Gated, {"inner.weight": "nested", "gate.weight": "nested", "head.weight": "ggn"}),
        (Twice, {"square.weight": "nested", "head.weight": "ggn"}),
        (Tied, {"first.weight": "nested", "head.weight": "ggn"}),
        (Attention, {"qkv.weight": "nested", "head.weight": "ggn"}),
    ],
)
def test_methods_and_exact_values(make: type[nn.Module], expected: dict[str, str]) -> None:
    torch.manual_seed(2)
    model = make().to(DTYPE).eval()
    data = batches(features=12 if make is Attention else 4)
    reference = reference_of(model)
    result = measure_layer_curvatures(model, cross_entropy, data, reference)
    assert result.methods == expected
    for name in expected:
        exact = dense_blocks(model, data, reference, name)
        assert result.max[name] == pytest.approx(float(exact.max().clamp(min=0)), rel=1e-6, abs=1e-12)
        assert result.mean[name] == pytest.approx(float(exact.mean()), rel=1e-6, abs=1e-12)


def test_batch_statistics_are_not_linear() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.ReLU(), nn.Linear(5, 3)).to(
        DTYPE
    )
    result = measure_layer_curvatures(model, cross_entropy, batches(), reference_of(model))
    assert result.methods == {"0.weight": "nested", "3.weight": "ggn"}


@pytest.mark.parametrize("name, linear", [("test_resnet", True), ("test_efficientnet", False)])
def test_timm_models(name: str, linear: bool) -> None:
    model = timm.create_model(name, num_classes=5).eval()
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() >= 2}
    found = piecewise_linear_layers(model, weights, torch.randn(2, 3, 32, 32))
    head = [n for n in weights if n.startswith(("fc.", "classifier."))]
    assert found == (set(weights) if linear else set(head))


def test_attention_trace_and_eigenvalue_use_double_backward_friendly_kernels() -> None:
    torch.manual_seed(4)
    model = Attention().to(DTYPE).eval()
    data = batches(features=12)
    assert top_eigenvalue(model, cross_entropy, data, iters=5) > 0
    estimate, stderr = hessian_trace(model, cross_entropy, data, max_probes=20)
    assert stderr > 0 and estimate == estimate


class Bypass(nn.Module):
    """Uses a Linear's weight without calling the module, so forward hooks on it never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(F.linear(x, self.inner.weight, self.inner.bias)))


def test_reverse_tangents_are_cross_checked() -> None:
    torch.manual_seed(5)
    model = Bypass().to(DTYPE).eval()
    data, reference = batches(), reference_of(model)
    fast = measure_layer_curvatures(model, cross_entropy, data, reference)
    nested = measure_layer_curvatures(model, cross_entropy, data, reference, method="nested")
    assert fast.methods == {"inner.weight": "ggn", "head.weight": "ggn"}
    assert fast.mean == pytest.approx(nested.mean, rel=1e-10)
    assert fast.mean["inner.weight"] > 0


def test_spot_check_overrides_a_wrong_linearity_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    monkeypatch.setattr("trainables.hessian.curvature.piecewise_linear_layers", lambda model, weights, x: set(weights))
    with pytest.warns(RuntimeWarning, match="d²z/dt²"):
        result = measure_layer_curvatures(model, cross_entropy, batches(), reference_of(model))
    assert set(result.methods.values()) == {"nested"}


class HardsigmoidFormula(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp((x + 3) / 6, 0, 1)


@pytest.mark.parametrize(
    "activation, expected",
    [
        (nn.SiLU(inplace=True), "nested"),  # second-order forward AD of in-place SiLU needs grad mode on
        (nn.Hardsigmoid(), "ggn"),  # piecewise linear; its native derivative has no forward AD
        (nn.Hardswish(), "nested"),
    ],
)
def test_activations_with_awkward_autodiff(activation: nn.Module, expected: str) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), activation, nn.Linear(5, 3)).to(DTYPE).eval()
    data, reference = batches(), reference_of(model)
    result = measure_layer_curvatures(model, cross_entropy, data, reference)
    assert result.methods["0.weight"] == expected
    # the dense reference needs double backward, which torch lacks for hardsigmoid: same function by hand
    dense = nn.Sequential(*(HardsigmoidFormula() if isinstance(m, nn.Hardsigmoid) else m for m in model))
    exact = dense_blocks(dense, data, reference, "0.weight")
    assert result.mean["0.weight"] == pytest.approx(float(exact.mean()), rel=1e-6)
    nested = measure_layer_curvatures(model, cross_entropy, data, reference, method="nested")
    assert nested.mean["0.weight"] == pytest.approx(float(exact.mean()), rel=1e-6)
