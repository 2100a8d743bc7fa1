"""Hessian measures against closed forms (docs/measures.md §8) and dense Hessians, in float64."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from trainables.hessian import (
    hessian_distance,
    hessian_trace,
    hessian_trace_per_layer,
    layer_curvatures,
    measure_layer_curvatures,
    reference_layer_curvatures,
    sample_curvatures,
    top_eigenvalue,
)
from trainables.hessian._derivatives import FrozenModel, forward_output_jvp, reverse_output_jvps

# torch's forward-AD decompositions (torch.func.jvp) still call torch.jit.script internally
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DTYPE = torch.float64
Batches = list[tuple[Tensor, Tensor]]


def half_squared_error(z: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (z.reshape(-1) - y) ** 2


def squared_error(z: Tensor, y: Tensor) -> Tensor:
    return (z.reshape(-1) - y) ** 2


def binary_cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(z.reshape(-1), y, reduction="none")


def cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z, y, reduction="none")


class TwoScalarNet(nn.Module):
    """z = w₂·w₁·x: the deep linear net of docs/measures.md §8."""

    def __init__(self, w1: float = 1.0, w2: float = 2.0) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(w1, dtype=DTYPE))
        self.w2 = nn.Parameter(torch.tensor(w2, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return self.w2 * self.w1 * x


class HiddenTanh(nn.Module):
    """Only Linear leaves, but a smooth activation inside forward(): invisible to module types."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.outer = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.outer(torch.tanh(self.inner(x)))


def smooth_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).to(DTYPE)


def relu_convnet() -> nn.Module:
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(DTYPE)
    for module in net.modules():  # non-trivial running statistics, so eval mode matters
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
    return net.eval()


def image_batches(classes: int = 3, sizes: Sequence[int] = (5, 3)) -> Batches:
    generator = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(b, 2, 6, 6, generator=generator, dtype=DTYPE),
            torch.randint(0, classes, (b,), generator=generator),
        )
        for b in sizes
    ]


def vector_batches(classes: int = 3, sizes: Sequence[int] = (5, 3), features: int = 4) -> Batches:
    generator = torch.Generator().manual_seed(4)
    return [
        (
            torch.randn(b, features, generator=generator, dtype=DTYPE),
            torch.randint(0, classes, (b,), generator=generator),
        )
        for b in sizes
    ]


def perturbed_reference(model: nn.Module, scale: float = 0.3, seed: int = 5) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() - scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for name, p in model.named_parameters()
    }


def weight_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


# ---- dense references ------------------------------------------------------------------------


def dense_hessian(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], batches: Batches, names: Sequence[str]
) -> Tensor:
    """Hessian of the mean loss over all samples w.r.t. the flattened ``names`` parameters."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def mean_loss(vector: Tensor) -> Tensor:
        pieces = dict(
            zip(
                names,
                (p.view(s) for p, s in zip(vector.split([s.numel() for s in shapes]), shapes, strict=True)),
                strict=True,
            )
        )
        losses = [loss_fn(functional_call(model, pieces, (x,)), y) for x, y in batches]
        return torch.cat(losses).mean()

    return torch.autograd.functional.hessian(mean_loss, flat)


def dense_block_forms(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Batches,
    reference: dict[str, Tensor],
    name: str,
) -> Tensor:
    """v_iᵀ H_ii(x_j) v_i for every sample j, from the dense per-sample block Hessian."""
    weight = dict(model.named_parameters())[name].detach()
    v = (weight - reference[name]).reshape(-1)
    values = []
    for x, y in batches:
        for j in range(x.shape[0]):

            def loss(w: Tensor, j: int = j, x: Tensor = x, y: Tensor = y) -> Tensor:
                logits = functional_call(model, {name: w.view(weight.shape)}, (x[j : j + 1],))
                return loss_fn(logits, y[j : j + 1]).sum()

            block = torch.autograd.functional.hessian(loss, weight.reshape(-1))
            values.append(v @ block @ v)
    return torch.stack(values)


def assert_close(actual: float, expected: float, rel: float = 1e-6) -> None:
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12), (actual, expected)


# ---- §6.1 / §6.2: the two-scalar deep linear net -----------------------------------------------

ONE_SAMPLE: Batches = [(torch.tensor([1.0], dtype=DTYPE), torch.tensor([1.0], dtype=DTYPE))]
TWO_SAMPLES: Batches = [(torch.tensor([1.0, 2.0], dtype=DTYPE), torch.tensor([1.0, 1.0], dtype=DTYPE))]
TOY_REFERENCE = {"w1": torch.tensor(0.0, dtype=DTYPE), "w2": torch.tensor(1.0, dtype=DTYPE)}  # v = (1, 1)
TOY_LAYERS = ["w1", "w2"]


def test_toy_block_forms_are_exact_and_differ_from_reference_code() -> None:
    net = TwoScalarNet()
    blocks = layer_curvatures(net, half_squared_error, ONE_SAMPLE, TOY_REFERENCE, layers=TOY_LAYERS)
    assert blocks == pytest.approx({"w1": 4.0, "w2": 1.0}, rel=1e-12)
    paper = reference_layer_curvatures(net, half_squared_error, ONE_SAMPLE, TOY_REFERENCE, layers=TOY_LAYERS)
    assert paper == pytest.approx({"w1": 7.0, "w2": 4.0}, rel=1e-12)


def test_toy_eigenvalue_and_trace() -> None:
    net = TwoScalarNet()
    assert_close(top_eigenvalue(net, half_squared_error, ONE_SAMPLE), (5 + math.sqrt(45)) / 2, rel=1e-9)
    estimate, stderr = hessian_trace(
        net, half_squared_error, ONE_SAMPLE, rel_tol=0.05, max_probes=4000, generator=torch.Generator().manual_seed(0)
    )
    assert abs(estimate - 5.0) <= 3 * stderr
    assert stderr <= 0.05 * abs(estimate)


def test_toy_two_samples_max_distance_eigenvalue_trace() -> None:
    net = TwoScalarNet()
    peaks = layer_curvatures(net, half_squared_error, TWO_SAMPLES, TOY_REFERENCE, layers=TOY_LAYERS)
    assert peaks == pytest.approx({"w1": 16.0, "w2": 4.0}, rel=1e-12)
    means = layer_curvatures(net, half_squared_error, TWO_SAMPLES, TOY_REFERENCE, layers=TOY_LAYERS, reduce="mean")
    assert means == pytest.approx({"w1": 10.0, "w2": 2.5}, rel=1e-12)
    distance = hessian_distance(net, half_squared_error, TWO_SAMPLES, TOY_REFERENCE, n=2, layers=TOY_LAYERS)
    assert_close(distance, 4.242641, rel=1e-6)
    assert_close(top_eigenvalue(net, half_squared_error, TWO_SAMPLES), 15.5405, rel=1e-5)
    result = hessian_trace_per_layer(net, half_squared_error, TWO_SAMPLES, rel_tol=0.05, max_probes=4000)
    assert abs(result.trace - 12.5) <= 3 * result.stderr
    assert result.per_layer["w1"] + result.per_layer["w2"] == pytest.approx(result.trace, rel=1e-12)
    paper = reference_layer_curvatures(net, half_squared_error, TWO_SAMPLES, TOY_REFERENCE, layers=TOY_LAYERS)
    assert paper == pytest.approx({"w1": 18.5, "w2": 11.0}, rel=1e-12)


def test_max_clips_negative_curvature_at_zero() -> None:
    # At w = (1, 2), x = 1, y = 3 (residual −1) the w1 block is 4 but the indefinite part makes
    # the reference-code contribution negative; a pure negative block is clipped by reduce="max".
    net = TwoScalarNet(w1=0.0, w2=0.0)  # ℓ = ½(w₂w₁x − y)², H_11 = w₂²x² = 0 at w = 0
    reference = {"w1": torch.tensor(-1.0, dtype=DTYPE), "w2": torch.tensor(-1.0, dtype=DTYPE)}
    data: Batches = [(torch.tensor([1.0], dtype=DTYPE), torch.tensor([1.0], dtype=DTYPE))]
    blocks = layer_curvatures(net, half_squared_error, data, reference, layers=TOY_LAYERS)
    assert blocks == {"w1": 0.0, "w2": 0.0}
    # ⟨v,(Hv)⟩ here is v₁H₁₂v₂ = −xy = −1 per layer: negative, and not clipped by the reference code.
    paper = reference_layer_curvatures(net, half_squared_error, data, reference, layers=TOY_LAYERS)
    assert paper == pytest.approx({"w1": -1.0, "w2": -1.0})


# ---- §6.3: convex models with closed forms ------------------------------------------------------


def linear_model(features: int, outputs: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, outputs, bias=False).to(DTYPE)


def regression_data(seed: int, n: int = 12, features: int = 3) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, features, generator=generator, dtype=DTYPE),
        torch.randn(n, generator=generator, dtype=DTYPE),
    )


LossFn = Callable[[Tensor, Tensor], Tensor]


def closed_form_case(kind: str) -> tuple[nn.Linear, LossFn, Batches, Tensor, Tensor]:
    """(model, loss, batches, mean Hessian, per-sample block forms along v = W − 0)."""
    x, target = regression_data(seed=6)
    n = x.shape[0]
    if kind == "linear":
        model = linear_model(3, 1, seed=7)
        hessian = 2 * x.T @ x / n
        blocks = 2 * (x @ model.weight.detach().reshape(-1)) ** 2
        return model, squared_error, [(x[:8], target[:8]), (x[8:], target[8:])], hessian, blocks
    if kind == "logistic":
        model = linear_model(3, 1, seed=8)
        labels = (target > 0).to(DTYPE)
        p = torch.sigmoid(x @ model.weight.detach().reshape(-1))
        hessian = x.T @ torch.diag(p * (1 - p)) @ x / n
        blocks = p * (1 - p) * (x @ model.weight.detach().reshape(-1)) ** 2
        return model, binary_cross_entropy, [(x[:5], labels[:5]), (x[5:], labels[5:])], hessian, blocks
    model = linear_model(3, 4, seed=9)
    labels = torch.arange(n) % 4
    weight = model.weight.detach()
    p = torch.softmax(x @ weight.T, dim=1)
    hessian = torch.stack(
        [torch.kron(torch.diag(p[k]) - torch.outer(p[k], p[k]), torch.outer(x[k], x[k])) for k in range(n)]
    ).mean(0)
    u = x @ weight.T  # J v with v = W: the output itself for a linear model
    blocks = (p * u**2).sum(1) - (p * u).sum(1) ** 2
    return model, cross_entropy, [(x[:7], labels[:7]), (x[7:], labels[7:])], hessian, blocks


@pytest.mark.parametrize("kind", ["linear", "logistic", "softmax"])
def test_closed_forms_eigenvalue_blocks_and_trace(kind: str) -> None:
    model, loss_fn, batches, hessian, blocks = closed_form_case(kind)
    zero = {"weight": torch.zeros_like(model.weight)}
    exact_top = float(torch.linalg.eigvalsh(hessian).max())
    assert_close(top_eigenvalue(model, loss_fn, batches, iters=20), exact_top)
    result = measure_layer_curvatures(model, loss_fn, batches, zero)
    assert_close(result.max["weight"], float(blocks.max()))
    assert_close(result.mean["weight"], float(blocks.mean()))
    assert result.n_samples == 12
    estimate, stderr = hessian_trace(model, loss_fn, batches, rel_tol=0.03, max_probes=3000)
    exact = float(torch.trace(hessian))
    assert abs(estimate - exact) <= 3 * stderr
    assert stderr <= 0.03 * abs(estimate)


def test_softmax_trace_identity() -> None:
    model, loss_fn, batches, hessian, _ = closed_form_case("softmax")
    x = torch.cat([b[0] for b in batches])
    p = torch.softmax(model(x), dim=1).detach()
    identity = float(((1 - (p**2).sum(1)) * (x**2).sum(1)).mean())
    assert_close(float(torch.trace(hessian)), identity, rel=1e-12)
    result = hessian_trace_per_layer(model, loss_fn, batches, rel_tol=0.01, max_probes=20000)
    assert result.n_probes < 20000  # converged on the standard error
    assert abs(result.trace - identity) <= 3 * result.stderr <= 0.03 * identity


def test_trace_and_eigenvalue_weight_unequal_batches_by_size() -> None:
    # Each batch Hessian is diagonal, so every Rademacher product is exact: the weighted mean over
    # whole cycles is exactly tr H̄ = 6 (an unweighted batch average would give 10).
    x1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=DTYPE)
    x2 = torch.tensor([[0.0, 3.0]], dtype=DTYPE)
    batches = [(x1, torch.zeros(3, dtype=DTYPE)), (x2, torch.zeros(1, dtype=DTYPE))]
    model = linear_model(2, 1, seed=10)
    estimate, _ = hessian_trace(model, squared_error, batches, rel_tol=0.0, max_probes=10, probes_per_batch=1)
    assert estimate == pytest.approx(6.0, rel=1e-12)
    estimate, _ = hessian_trace(model, squared_error, batches, rel_tol=0.0, max_probes=16)  # 4 rounds of 4
    assert estimate == pytest.approx(6.0, rel=1e-12)
    assert_close(top_eigenvalue(model, squared_error, batches), 5.0, rel=1e-12)


# ---- dense Hessians on tiny nets ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, batches_of", [(smooth_mlp, vector_batches), (relu_convnet, image_batches), (HiddenTanh, vector_batches)]
)
def test_block_forms_match_dense_per_sample_blocks(
    make: Callable[[], nn.Module], batches_of: Callable[[], Batches]
) -> None:
    torch.manual_seed(11)
    model = make().to(DTYPE).eval()
    batches = batches_of()
    reference = perturbed_reference(model)
    result = measure_layer_curvatures(model, cross_entropy, batches, reference)
    for name in weight_names(model):
        exact = dense_block_forms(model, cross_entropy, batches, reference, name)
        assert_close(result.max[name], float(exact.max().clamp(min=0)))
        assert_close(result.mean[name], float(exact.mean()))


def test_shortcut_is_used_exactly_where_exact() -> None:
    relu = measure_layer_curvatures(relu_convnet(), cross_entropy, image_batches(), perturbed_reference(relu_convnet()))
    assert set(relu.methods.values()) == {"ggn"}
    smooth = measure_layer_curvatures(smooth_mlp(), cross_entropy, vector_batches(), perturbed_reference(smooth_mlp()))
    # the head is linear in its own weight even after a GELU: the shortcut is exact there only
    assert smooth.methods == {"0.weight": "nested", "2.weight": "nested", "4.weight": "ggn"}
    torch.manual_seed(12)
    hidden = HiddenTanh().to(DTYPE)
    mixed = measure_layer_curvatures(hidden, cross_entropy, vector_batches(), perturbed_reference(hidden))
    # the last layer is linear in its weight given its input; the first sees the hidden tanh
    assert mixed.methods == {"inner.weight": "nested", "outer.weight": "ggn"}


def test_smooth_net_needs_the_second_order_term() -> None:
    model, batches = smooth_mlp(), vector_batches()
    reference = perturbed_reference(model)
    exact = measure_layer_curvatures(model, cross_entropy, batches, reference)
    surrogate = measure_layer_curvatures(model, cross_entropy, batches, reference, method="ggn")
    for name in ["0.weight", "2.weight"]:
        assert abs(exact.mean[name] - surrogate.mean[name]) > 1e-6 * abs(exact.mean[name])


@pytest.mark.parametrize("method", ["ggn", "auto"])
def test_fast_path_equals_nested_path_on_relu_net(method: str) -> None:
    model, batches = relu_convnet(), image_batches()
    reference = perturbed_reference(model)
    nested = measure_layer_curvatures(model, cross_entropy, batches, reference, method="nested")
    fast = measure_layer_curvatures(model, cross_entropy, batches, reference, method=method)  # type: ignore[arg-type]
    for name in nested.max:
        assert_close(fast.max[name], nested.max[name], rel=1e-10)
        assert_close(fast.mean[name], nested.mean[name], rel=1e-10)


def test_forward_gauss_newton_path_when_outputs_exceed_layers() -> None:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 7)).to(DTYPE)
    batches = vector_batches(classes=7)
    reference = perturbed_reference(model)
    fast = measure_layer_curvatures(model, cross_entropy, batches, reference)
    nested = measure_layer_curvatures(model, cross_entropy, batches, reference, method="nested")
    assert set(fast.methods.values()) == {"ggn"}
    for name in nested.mean:
        assert_close(fast.mean[name], nested.mean[name], rel=1e-10)


def test_reverse_and_forward_output_tangents_agree() -> None:
    model, ((x, _), _) = relu_convnet(), image_batches()
    reference = perturbed_reference(model)
    params = dict(model.named_parameters())
    layers = {
        n: (model.get_submodule(n.rpartition(".")[0]), params[n].detach() - reference[n]) for n in weight_names(model)
    }
    logits, tangents = reverse_output_jvps(model, x, layers)
    for name, (_, v) in layers.items():
        with torch.no_grad():
            z, u = forward_output_jvp(FrozenModel(model), {name: v}, x)
        torch.testing.assert_close(tangents[name], u)
        torch.testing.assert_close(logits, z)


def test_non_default_loss_is_exact_on_relu_net() -> None:
    def tempered_cross_entropy(z: Tensor, y: Tensor) -> Tensor:  # an arbitrary smooth per-sample loss
        return F.cross_entropy(z / 2, y, reduction="none") + 0.1 * (z**2).sum(1)

    model, batches = relu_convnet(), image_batches()
    reference = perturbed_reference(model)
    result = measure_layer_curvatures(model, tempered_cross_entropy, batches, reference)
    assert set(result.methods.values()) == {"ggn"}
    for name in weight_names(model):
        exact = dense_block_forms(model, tempered_cross_entropy, batches, reference, name)
        assert_close(result.max[name], float(exact.max().clamp(min=0)))


@pytest.mark.parametrize("make, batches_of", [(smooth_mlp, vector_batches), (relu_convnet, image_batches)])
def test_trace_and_eigenvalue_match_dense(make: Callable[[], nn.Module], batches_of: Callable[[], Batches]) -> None:
    model, batches = make(), batches_of()
    names = [n for n, _ in model.named_parameters()]
    hessian = dense_hessian(model.eval(), cross_entropy, batches, names)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert_close(top_eigenvalue(model, cross_entropy, batches, iters=40), float(eigenvalues.max()))
    result = hessian_trace_per_layer(model, cross_entropy, batches, rel_tol=0.05, max_probes=3000)
    assert abs(result.trace - float(torch.trace(hessian))) <= 3 * result.stderr
    offsets = torch.cumsum(torch.tensor([0] + [p.numel() for p in model.parameters()]), 0)
    for i, name in enumerate(names):
        block = hessian[offsets[i] : offsets[i + 1], offsets[i] : offsets[i + 1]]
        error = abs(result.per_layer[name] - float(torch.trace(block)))
        assert error <= 4 * result.per_layer_stderr[name] + 1e-12


def test_lanczos_stops_once_the_top_ritz_residual_is_small() -> None:
    from trainables.hessian.eigen import lanczos_tridiagonal

    spectrum = torch.cat([torch.tensor([10.0, 6.0]), torch.linspace(-3, 3, 198)]).to(DTYPE)
    start = torch.ones(200, dtype=DTYPE)
    full = lanczos_tridiagonal(lambda v: spectrum * v, start, 60)
    early = lanczos_tridiagonal(lambda v: spectrum * v, start, 60, rel_tol=1e-3)
    assert full.tridiagonal.shape[0] == 60 and early.tridiagonal.shape[0] < 30
    top, residual = early.top()
    assert 0 < residual <= 1e-3 * top
    assert 10 - residual <= top <= 10  # Ritz values never exceed λ_max; the residual bounds the error
    assert_close(full.top()[0], 10.0, rel=1e-12)
    # the residual is the true one: ‖H y − θ y‖ of the Ritz vector, rebuilt from the Lanczos basis
    few = lanczos_tridiagonal(lambda v: spectrum * v, start, 5)
    theta, stated = few.top()
    basis = torch.zeros(5, 200, dtype=DTYPE)
    basis[0] = start / start.norm()
    for k in range(4):
        w = spectrum * basis[k]
        w -= basis[: k + 1].T @ (basis[: k + 1] @ w)
        w -= basis[: k + 1].T @ (basis[: k + 1] @ w)
        basis[k + 1] = w / w.norm()
    ritz = basis.T @ torch.linalg.eigh(few.tridiagonal).eigenvectors[:, -1]
    assert_close(stated, float((spectrum * ritz - theta * ritz).norm()), rel=1e-8)
    assert stated >= 10 - theta  # and it bounds the error


def test_early_stopped_top_eigenvalue_matches_dense_in_fewer_iterations() -> None:
    from trainables.hessian.eigen import top_eigenvalue_estimate

    model, batches = relu_convnet(), image_batches()
    names = [n for n, _ in model.named_parameters()]
    exact = float(torch.linalg.eigvalsh(dense_hessian(model.eval(), cross_entropy, batches, names)).max())
    value, residual, iterations = top_eigenvalue_estimate(model, cross_entropy, batches, iters=40, rel_tol=1e-3)
    assert iterations < 40 and abs(value - exact) <= residual <= 1e-3 * abs(exact)
    assert value == top_eigenvalue(model, cross_entropy, batches, iters=40, rel_tol=1e-3)
    with pytest.raises(ValueError, match="rel_tol"):
        top_eigenvalue(model, cross_entropy, batches, rel_tol=1.0)


def test_a_capped_basis_restarts_and_still_finds_the_top_eigenvalue_within_its_residual() -> None:
    """basis_size bounds the memory: runs that fill it restart from their top Ritz vector. The
    answer agrees with the dense Hessian within the residual it states, and with the uncapped
    run; every product counts toward ``iters``."""
    from trainables.hessian.eigen import top_eigenvalue_estimate

    model, batches = relu_convnet(), image_batches()
    names = [n for n, _ in model.named_parameters()]
    exact = float(torch.linalg.eigvalsh(dense_hessian(model.eval(), cross_entropy, batches, names)).max())
    free = top_eigenvalue_estimate(model, cross_entropy, batches, iters=40, rel_tol=1e-4)
    capped = top_eigenvalue_estimate(model, cross_entropy, batches, iters=40, rel_tol=1e-4, basis_size=3)
    assert capped.iterations > 3  # it had to restart
    assert capped.value <= exact + 1e-9 * abs(exact)  # a Ritz value never exceeds λ_max
    assert abs(capped.value - exact) <= capped.residual <= 1e-4 * abs(exact)
    assert abs(capped.value - free.value) <= capped.residual + free.residual
    short = top_eigenvalue_estimate(model, cross_entropy, batches, iters=7, rel_tol=0.0, basis_size=3)
    assert short.iterations == 7  # 3 + 3 + 1 products
    with pytest.raises(ValueError, match="basis_size"):
        top_eigenvalue_estimate(model, cross_entropy, batches, basis_size=1)


def test_top_eigenvalue_is_the_largest_algebraic_one() -> None:
    # H = [[4,3],[3,1]] scaled by −1 (loss −ℓ): eigenvalues 0.854 and −5.854; λ_max is 0.854, not −5.854.
    net = TwoScalarNet()
    value = top_eigenvalue(net, lambda z, y: -half_squared_error(z, y), ONE_SAMPLE)
    assert_close(value, (math.sqrt(45) - 5) / 2, rel=1e-9)


# ---- the reference (paper-code) variant -----------------------------------------------------------


def test_reference_variant_equals_dense_inner_products_and_differs_from_blocks() -> None:
    model, batches = smooth_mlp(), vector_batches(sizes=(4, 4))
    reference = perturbed_reference(model, scale=0.5)
    names = weight_names(model)
    paper = reference_layer_curvatures(model, cross_entropy, batches, reference)
    blocks = layer_curvatures(model, cross_entropy, batches, reference, reduce="mean")
    params = dict(model.named_parameters())
    v = torch.cat([(params[n].detach() - reference[n]).reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]
    per_batch = []
    for batch in batches:
        hv = dense_hessian(model, cross_entropy, [batch], names) @ v
        per_batch.append([float(a @ b) for a, b in zip(v.split(sizes), hv.split(sizes), strict=True)])
    expected = [max(values) for values in zip(*per_batch, strict=True)]
    for name, value in zip(names, expected, strict=True):
        assert_close(paper[name], value)
    assert any(abs(paper[n] - blocks[n]) > 0.05 * abs(blocks[n]) for n in names)
    chunked = reference_layer_curvatures(
        model,
        cross_entropy,
        [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))],
        reference,
        batch_size=4,
    )
    assert chunked == pytest.approx(paper, rel=1e-10)


# ---- state, determinism, errors -------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_modes_buffers_grads_and_requires_grad_are_left_untouched() -> None:
    model, batches = relu_convnet(), image_batches()
    model.train()
    model.get_submodule("1").eval()  # a submodule with its own mode must keep it
    model.get_submodule("0").bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    before = snapshot(model)
    reference = perturbed_reference(model)
    layer_curvatures(model, cross_entropy, batches, reference)
    hessian_distance(model, cross_entropy, batches, reference, n=10)
    reference_layer_curvatures(model, cross_entropy, batches, reference)
    hessian_trace(model, cross_entropy, batches, max_probes=12)
    top_eigenvalue(model, cross_entropy, batches, iters=3)
    assert [m.training for m in model.modules()] == modes
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_modes_are_restored_on_exceptions() -> None:
    model = relu_convnet().train()

    def broken(z: Tensor, y: Tensor) -> Tensor:
        raise RuntimeError("boom")

    for call in (
        lambda: layer_curvatures(model, broken, image_batches(), perturbed_reference(model)),
        lambda: hessian_trace(model, broken, image_batches()),
        lambda: top_eigenvalue(model, broken, image_batches()),
    ):
        with pytest.raises(RuntimeError, match="boom"):
            call()
        assert all(m.training for m in model.modules())


def test_trace_and_eigenvalue_are_deterministic_for_a_generator() -> None:
    model, batches = smooth_mlp(), vector_batches()

    def trace(seed: int) -> tuple[float, float]:
        generator = torch.Generator().manual_seed(seed)
        return hessian_trace(model, cross_entropy, batches, max_probes=15, generator=generator)

    assert trace(0) == trace(0)
    assert trace(0) != trace(1)
    eigen = [
        top_eigenvalue(model, cross_entropy, batches, iters=3, generator=torch.Generator().manual_seed(s))
        for s in (0, 0, 1)
    ]
    assert eigen[0] == eigen[1] != eigen[2]


def test_one_shot_iterators_are_accepted() -> None:
    model, batches = smooth_mlp(), vector_batches()
    assert top_eigenvalue(model, cross_entropy, iter(batches), iters=5) == top_eigenvalue(
        model, cross_entropy, batches, iters=5
    )
    reference = perturbed_reference(model)
    assert layer_curvatures(model, cross_entropy, iter(batches), reference) == layer_curvatures(
        model, cross_entropy, batches, reference
    )


def test_float32_batches_follow_the_model_dtype() -> None:
    model, batches = smooth_mlp(), vector_batches()
    single = [(x.float(), y) for x, y in batches]
    rounded = [(x.float().double(), y) for x, y in batches]
    reference = perturbed_reference(model)
    assert layer_curvatures(model, cross_entropy, single, reference) == layer_curvatures(
        model, cross_entropy, rounded, reference
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": ["nope.weight"]}, "unknown parameter name"),
        ({"layers": "0.weight"}, "sequence of parameter names"),
        ({"reduce": "median"}, "reduce='median'"),
        ({"method": "exact"}, "method='exact'"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], message: str) -> None:
    model = smooth_mlp()
    with pytest.raises(ValueError, match=message):
        layer_curvatures(model, cross_entropy, vector_batches(), perturbed_reference(model), **kwargs)  # type: ignore[arg-type]


def test_bad_reference_and_data_raise() -> None:
    model = smooth_mlp()
    reference = perturbed_reference(model)
    partial = {k: v for k, v in reference.items() if k != "2.weight"}
    with pytest.raises(ValueError, match=r"no entry for layer '2\.weight'"):
        layer_curvatures(model, cross_entropy, vector_batches(), partial)
    with pytest.raises(ValueError, match="shape"):
        layer_curvatures(model, cross_entropy, vector_batches(), {**reference, "0.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="no batches"):
        layer_curvatures(model, cross_entropy, [], reference)
    with pytest.raises(ValueError, match="no batches"):
        hessian_trace(model, cross_entropy, [])
    with pytest.raises(ValueError, match="per-sample losses"):
        layer_curvatures(model, lambda z, y: F.cross_entropy(z, y), vector_batches(), reference)
    with pytest.raises(ValueError, match="n=0"):
        hessian_distance(model, cross_entropy, vector_batches(), reference, n=0)
    with pytest.raises(ValueError, match="max_probes"):
        hessian_trace(model, cross_entropy, vector_batches(), max_probes=0)
    with pytest.raises(ValueError, match="iters"):
        top_eigenvalue(model, cross_entropy, vector_batches(), iters=0)


def test_sample_curvatures_are_the_per_sample_values() -> None:
    model, batches = smooth_mlp(), vector_batches()
    reference = perturbed_reference(model)
    names, values = sample_curvatures(model, cross_entropy, batches, reference)
    assert names == weight_names(model) and values.shape == (3, 8)
    for i, name in enumerate(names):
        torch.testing.assert_close(values[i], dense_block_forms(model, cross_entropy, batches, reference, name))


def test_products_sharing_one_graph_equal_lone_products() -> None:
    from trainables.hessian._derivatives import batch_hvp, batch_hvps

    torch.manual_seed(12)
    model = relu_convnet().to(DTYPE).eval()
    x, y = image_batches()[0]
    leaves = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    vectors = [[torch.randn_like(p) for p in leaves.values()] for _ in range(3)]
    shared = batch_hvps(model, cross_entropy, leaves, vectors, x, y)
    for vector, products in zip(vectors, shared, strict=True):
        for a, b in zip(products, batch_hvp(model, cross_entropy, leaves, vector, x, y), strict=True):
            assert_close(a, b, rel=1e-12)


CONV_GEOMETRIES = [  # (dims, stride, padding, dilation, groups, bias)
    (1, 1, 0, 1, 1, True),
    (2, 2, 1, 1, 1, False),
    (2, 1, (1, 2), (2, 1), 2, True),
    (3, (1, 2, 1), 1, 1, 1, True),
]


@pytest.mark.parametrize(("dims", "stride", "padding", "dilation", "groups", "bias"), CONV_GEOMETRIES)
def test_fast_conv_double_backward_equals_natives(
    dims: int, stride: Any, padding: Any, dilation: Any, groups: int, bias: bool
) -> None:
    """HVPs through trainables.hessian._conv (used by batch_hvp) equal native double backward,
    including the cross terms with the layer below (two stacked convolutions, smooth activation)."""
    from trainables.hessian._derivatives import autodiff_kernels, batch_hvp

    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    torch.manual_seed(13)
    model = nn.Sequential(
        conv(2, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias),
        nn.Tanh(),
        conv(4, 4, 2, groups=groups, bias=bias),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    x = torch.randn(5, 2, *[7] * dims, dtype=DTYPE)
    y = torch.randint(0, 3, (5,))
    model = model.to(DTYPE)
    model(x)
    leaves = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    vector = [torch.randn_like(p) for p in leaves.values()]
    with torch.enable_grad(), autodiff_kernels(double_backward=True):
        assert type(model[0](x).grad_fn).__name__ == "_ConvolutionBackward"  # the fast path ran
    loss = cross_entropy(functional_call(model, leaves, (x,)), y).mean()
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    native = torch.autograd.grad(grads, list(leaves.values()), grad_outputs=vector)
    for a, b in zip(batch_hvp(model, cross_entropy, leaves, vector, x, y), native, strict=True):
        assert_close(a, b, rel=1e-10)


def test_fast_conv_leaves_string_padding_to_the_native_op() -> None:
    from trainables.hessian._derivatives import autodiff_kernels

    conv = nn.Conv2d(2, 3, 3, padding="same")
    with torch.enable_grad(), autodiff_kernels(double_backward=True):
        assert type(conv(torch.randn(1, 2, 5, 5)).grad_fn).__name__ == "ConvolutionBackward0"


def test_trace_rounds_are_the_independent_samples() -> None:
    """With several probes per batch, n_probes counts products and the standard error comes
    from the rounds: 4 rounds of 3 probes stop exactly at max_probes, any rounding included."""
    model = linear_model(4, 3, seed=10)
    batches = vector_batches()
    result = hessian_trace_per_layer(model, cross_entropy, batches, rel_tol=0.0, max_probes=11, probes_per_batch=3)
    assert result.n_probes == 11
    with pytest.raises(ValueError, match="probes_per_batch"):
        hessian_trace(model, cross_entropy, batches, probes_per_batch=0)
