"""Regularizers against hand computations: REGSL constraint and self-labeling, consistent loss, NSO, SAM.

Tiny float64 networks (conv/BN/ReLU/linear) make the gradient checks exact; every expected value
is recomputed here from the formula in the regularizer's docstring, not from the implementation.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import (
    ConfigError,
    ConsistentConfig,
    ConstraintConfig,
    NSOConfig,
    RunConfig,
    SAMConfig,
    SelfLabelConfig,
)
from trainables.models import LayerGroups
from trainables.noise import symmetric_transition
from trainables.regularizers import RunContext, build_regularizers
from trainables.regularizers.consistent import (
    ConsistentLoss,
    backward_corrected_loss,
    checked_inverse,
)
from trainables.regularizers.constraint import DistanceConstraint, group_radii, project_
from trainables.regularizers.nso import NSO, sigma_at
from trainables.regularizers.sam import SAM
from trainables.regularizers.self_label import SelfLabeling, downweighted_loss, temperature

# -- fixtures and helpers ----------------------------------------------------------------------------


class Net(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → pool → fc: two body groups and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body2(self.body1(x)).mean(dim=(2, 3)))


GROUPS = LayerGroups(groups=(("body1.0.weight",), ("body2.0.weight",)), head=("fc.weight",))


def make_net(dtype: torch.dtype = torch.float64, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype).train()


def make_ctx(model: nn.Module, *, labels: torch.Tensor | None = None, seed: int = 0, **kw: object) -> RunContext:
    labels = torch.zeros(8, dtype=torch.long) if labels is None else labels
    fields: dict[str, object] = dict(
        model=model,
        reference={n: p.detach().clone() for n, p in model.named_parameters()},
        groups=GROUPS,
        labels=labels.clone(),
        noisy=labels.clone(),
        clean=None,
        num_classes=3,
        epochs=4,
        transition=None,
        noise_rate=0.0,
        generator=torch.Generator().manual_seed(seed),
        log=lambda _: None,
    )
    fields.update(kw)
    return RunContext(**fields)  # type: ignore[arg-type]


def batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 5, 5, generator=gen, dtype=dtype), torch.arange(8) % 3


class Closure:
    """The loop's closure contract (forward, optional backward) with a call log."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.calls: list[bool] = []  # backward flag of each call

    def __call__(self, backward: bool = True) -> torch.Tensor:
        self.calls.append(backward)
        loss = F.cross_entropy(self.model(self.x), self.y)
        if backward:
            loss.backward()
        return loss


def grad_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: list[torch.Tensor]) -> list[torch.Tensor]:
    """∇f(W + delta) in train mode, on a copy (the original is untouched)."""
    twin = copy.deepcopy(model)
    params = list(twin.parameters())
    with torch.no_grad():
        for p, d in zip(params, delta, strict=True):
            p.add_(d)
    return list(torch.autograd.grad(F.cross_entropy(twin(x), y), params))


def bn_stats_after_forward(model: nn.Module, x: torch.Tensor, delta: list[torch.Tensor]) -> list[torch.Tensor]:
    """Running mean/var a train-mode forward at W + delta would leave (on a copy)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(twin.parameters(), delta, strict=True):
            p.add_(d)
        twin(x)
    return bn_stats(twin)


def bn_stats(model: nn.Module) -> list[torch.Tensor]:
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    buffers = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    return [torch.as_tensor(t).clone() for triple in buffers for t in triple]


def zeros_like_params(model: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) for p in model.parameters()]


def hand_noise(model: nn.Module, state: torch.Tensor, sigma: float, k: int) -> list[list[torch.Tensor]]:
    """The documented draw: U_j = σ·ξ_j, ξ_j one flat torch.randn over all trainable parameters."""
    gen = torch.Generator().set_state(state)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    draws = []
    for _ in range(k):
        flat = torch.randn(sum(sizes), generator=gen, dtype=params[0].dtype)
        draws.append([sigma * v.view_as(p) for v, p in zip(flat.split(sizes), params, strict=True)])
    return draws


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-10) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def run_gradient(reg: NSO | SAM, model: nn.Module, epoch: int = 1) -> tuple[Closure, list[torch.Tensor]]:
    x, y = batch(next(model.parameters()).dtype)
    closure = Closure(model, x, y)
    reg.gradient(closure, epoch)
    return closure, [p.grad for p in model.parameters()]  # type: ignore[misc]


# -- layer-wise distance constraint --------------------------------------------------------


def test_projection_lands_exactly_on_the_ball() -> None:
    gen = torch.Generator().manual_seed(0)
    center = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    delta = 3.0 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    weight = center + delta
    project_(weight, center, 0.7)
    assert float((weight - center).norm()) == pytest.approx(0.7, abs=1e-6)
    torch.testing.assert_close((weight - center) / 0.7, delta / delta.norm())  # same direction


def test_projection_leaves_inside_points_unchanged() -> None:
    center = torch.ones(4, 4)
    weight = center + 0.01
    before = weight.clone()
    project_(weight, center, 1.0)
    assert torch.equal(weight, before)


def test_group_radii_geometric_and_free_scales() -> None:
    assert group_radii(ConstraintConfig(radius=2.0, growth=1.5), 3) == pytest.approx([2.0, 3.0, 4.5])
    free = ConstraintConfig(radius=2.0, growth=1.5, group_scales=(1.0, 0.5, 4.0))
    assert group_radii(free, 3) == pytest.approx([2.0, 1.0, 8.0])
    with pytest.raises(ConfigError, match="has 2 values but the model has 3 depth groups"):
        group_radii(ConstraintConfig(group_scales=(1.0, 2.0)), 3)


def _push_far(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(5.0)


def _dist(model: nn.Module, ref: dict[str, torch.Tensor], name: str, from_zero: bool = False) -> float:
    w = dict(model.named_parameters())[name]
    return float((w.norm() if from_zero else (w - ref[name]).norm()).detach())


@pytest.mark.parametrize("from_zero", [False, True])
def test_constraint_projects_each_group_and_the_head(from_zero: bool) -> None:
    model = make_net()
    reg = DistanceConstraint(
        ConstraintConfig(enabled=True, radius=0.5, growth=2.0, head_radius=0.3, head_from_zero=from_zero)
    )
    ctx = make_ctx(model)
    reg.setup(ctx)
    biases = {n: p.detach().clone() + 5.0 for n, p in model.named_parameters() if n.endswith("bias")}
    _push_far(model)
    reg.after_step()
    assert _dist(model, ctx.reference, "body1.0.weight") == pytest.approx(0.5, abs=1e-9)
    assert _dist(model, ctx.reference, "body2.0.weight") == pytest.approx(1.0, abs=1e-9)  # D·γ¹
    assert _dist(model, ctx.reference, "fc.weight", from_zero) == pytest.approx(0.3, abs=1e-9)
    for n, p in model.named_parameters():
        if n in biases:  # biases (and BN parameters) are unconstrained
            assert torch.equal(p, biases[n])


def test_penalty_variant_value_and_no_projection() -> None:
    model = make_net()
    cfg = ConstraintConfig(enabled=True, mode="penalty", radius=0.5, group_scales=(1.0, 3.0), penalty=0.1)
    reg = DistanceConstraint(cfg)
    ctx = make_ctx(model)
    reg.setup(ctx)
    _push_far(model)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.after_step()  # penalty mode never projects
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())

    def sq(name: str) -> float:
        return _dist(model, ctx.reference, name) ** 2

    expected = 0.1 * (1.0 * sq("body1.0.weight") + 3.0 * sq("body2.0.weight") + 1.0 * sq("fc.weight"))
    penalty = reg.penalty()
    assert penalty is not None and float(penalty.detach()) == pytest.approx(expected, rel=1e-12)
    penalty.backward()
    w = dict(model.named_parameters())["body2.0.weight"]
    torch.testing.assert_close(w.grad, 0.1 * 3.0 * 2 * (w - ctx.reference["body2.0.weight"]).detach())


def test_projection_mode_adds_no_penalty() -> None:
    reg = DistanceConstraint(ConstraintConfig(enabled=True))
    reg.setup(make_ctx(make_net()))
    assert reg.penalty() is None


# -- self-labeling ---------------------------------------------------------------------------


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def _self_label(labels: list[int], **cfg: object) -> SelfLabeling:
    reg = SelfLabeling(SelfLabelConfig(enabled=True, **cfg))  # type: ignore[arg-type]
    reg.setup(make_ctx(make_net(), labels=torch.tensor(labels)))
    return reg


def test_correction_only_when_confident_and_disagreeing() -> None:
    reg = _self_label([0, 0, 1, 2, 0, 0], correct_start=3, threshold=0.9)
    probs = [
        [0.02, 0.95, 0.03],  # sample 5: confident, argmax 1 ≠ label 0 → corrected
        [0.02, 0.03, 0.95],  # sample 2: confident, argmax 2 ≠ label 1 → corrected
        [0.30, 0.60, 0.10],  # sample 3: argmax 1 ≠ label 2 but not confident → kept
        [0.97, 0.02, 0.01],  # sample 0: confident and agreeing → kept
    ]
    index = torch.tensor([5, 2, 3, 0])
    reg.relabel(_logits(probs), index, epoch=2)  # before E_c: nothing changes
    assert reg.ctx.labels.tolist() == [0, 0, 1, 2, 0, 0]
    reg.relabel(_logits(probs), index, epoch=3)
    assert reg.ctx.labels.tolist() == [0, 0, 2, 2, 0, 1]
    assert reg.ctx.noisy.tolist() == [0, 0, 1, 2, 0, 0]  # the given labels are never modified


def test_correction_threshold_is_strict() -> None:
    logits = _logits([[0.05, 0.9, 0.05]])
    at = float(torch.softmax(logits, 1).max())  # exactly the confidence the rule sees
    reg = _self_label([0], correct_start=1, threshold=at)
    reg.relabel(logits, torch.tensor([0]), epoch=1)
    assert reg.ctx.labels.tolist() == [0]
    reg = _self_label([0], correct_start=1, threshold=at - 1e-9)
    reg.relabel(logits, torch.tensor([0]), epoch=1)
    assert reg.ctx.labels.tolist() == [1]


def test_downweighting_weights_are_detached_softmax() -> None:
    losses = torch.tensor([0.2, 1.5, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    tau = 0.8
    weights = torch.exp(-losses.detach() / tau) / torch.exp(-losses.detach() / tau).sum()
    loss = downweighted_loss(losses, tau)
    assert float(loss.detach()) == pytest.approx(float((weights * losses.detach()).sum()), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, losses)
    torch.testing.assert_close(grad, weights)  # d loss / d ℓ_j = w_j: no gradient through w


def test_reduce_is_plain_mean_before_reweight_start() -> None:
    reg = _self_label([0], reweight_start=3, temperature=2.0)
    losses = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert reg.reduce(losses, epoch=2) is None  # the loop then takes the mean
    expected = downweighted_loss(losses, temperature(reg.cfg, 3))
    assert float(reg.reduce(losses, epoch=3)) == pytest.approx(float(expected))  # type: ignore[arg-type]


def test_temperature_schedule_follows_the_reference_convention() -> None:
    """REGSL's schedule: at the end of epoch t > E_r, τ ← τ0·max(0.5, e^{−0.1(t − E_r)}).

    So the τ in force during epoch e is τ0 while e − 1 ≤ E_r, then τ0·max(0.5, e^{−0.1(e − 1 − E_r)}).
    """
    cfg = SelfLabelConfig(enabled=True, reweight_start=5, temperature=2.0)
    assert [temperature(cfg, e) for e in range(1, 7)] == [2.0] * 6
    assert temperature(cfg, 7) == pytest.approx(2.0 * math.exp(-0.1))
    assert temperature(cfg, 12) == pytest.approx(2.0 * math.exp(-0.6))
    assert temperature(cfg, 13) == pytest.approx(1.0)  # e^{−0.7} < 0.5: the floor
    assert temperature(cfg, 40) == pytest.approx(1.0)


def test_correction_precision_and_recall() -> None:
    clean = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    noisy = torch.tensor([0, 1, 1, 2, 2, 0, 1])  # wrong at 1, 3, 5, 6
    reg = SelfLabeling(SelfLabelConfig(enabled=True))
    reg.setup(make_ctx(make_net(), labels=noisy, clean=clean))
    reg.ctx.labels.copy_(torch.tensor([0, 0, 1, 2, 1, 0, 0]))  # changed at 1 (✓), 4 (✗), 6 (✓)
    metrics = reg.end_epoch(1)
    assert metrics["sl_changed"] == pytest.approx(3 / 7)
    assert metrics["sl_precision"] == pytest.approx(2 / 3)
    assert metrics["sl_recall"] == pytest.approx(2 / 4)


def test_self_label_state_round_trip() -> None:
    reg = _self_label([0, 1, 2])
    reg.ctx.labels[1] = 2
    state = reg.state_dict()
    other = _self_label([0, 1, 2])
    other.load_state_dict(state)
    assert other.ctx.labels.tolist() == [0, 2, 2]


# -- consistent loss ----------------------------------------------------------------------------


def _random_transition(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.dirichlet(np.ones(k), size=k) * 0.4 + np.eye(k) * 0.6
    return m / m.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("transition", [symmetric_transition(4, 0.3), _random_transition(4, 0)])
def test_consistent_loss_is_unbiased_for_the_clean_loss(transition: np.ndarray) -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inverse = torch.as_tensor(np.linalg.inv(transition))
    f = torch.as_tensor(transition)
    for y in range(4):
        per_noisy = torch.stack([backward_corrected_loss(logits, torch.full((6,), k), inverse) for k in range(4)])
        averaged = (f[y][:, None] * per_noisy).sum(0)  # E over ỹ ~ F[y, ·]
        torch.testing.assert_close(
            averaged, F.cross_entropy(logits, torch.full((6,), y), reduction="none"), rtol=1e-12, atol=1e-12
        )


def test_consistent_regularizer_uses_the_task_rate_when_none_given() -> None:
    reg = ConsistentLoss(ConsistentConfig(enabled=True))
    reg.setup(make_ctx(make_net(), num_classes=3, noise_rate=0.4))
    np.testing.assert_allclose(reg.transition, symmetric_transition(3, 0.4))
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1, 0])
    inv = np.linalg.inv(symmetric_transition(3, 0.4))
    nll = -F.log_softmax(logits, 1).numpy()
    expected = np.array([(inv[labels[i]] * nll[i]).sum() for i in range(5)])
    np.testing.assert_allclose(reg.sample_loss(logits, labels).numpy(), expected, rtol=1e-12)  # type: ignore[union-attr]


@pytest.mark.parametrize("rate", [0.75, 0.8])
def test_singular_transition_is_rejected(rate: float) -> None:
    reg = ConsistentLoss(ConsistentConfig(enabled=True, rate=rate))
    with pytest.raises(ConfigError, match=f"consistent.rate={rate}.*singular"):
        reg.setup(make_ctx(make_net(), num_classes=4))


def test_rank_deficient_estimated_transition_is_rejected() -> None:
    with pytest.raises(ConfigError, match="singular"):
        checked_inverse(np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))


# -- NSO ----------------------------------------------------------------------------------------


def _nso(model: nn.Module, seed: int = 3, epochs: int = 4, **cfg: object) -> NSO:
    reg = NSO(NSOConfig(enabled=True, **cfg))  # type: ignore[arg-type]
    reg.setup(make_ctx(model, seed=seed, epochs=epochs))
    return reg


def _mean_perturbed_grad(model: nn.Module, draws: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    x, y = batch()
    grads = [grad_at(model, x, y, [s * u for u in draw]) for draw in draws for s in (1.0, -1.0)]
    return [torch.stack(gs).mean(0) for gs in zip(*grads, strict=True)]


@pytest.mark.parametrize(("k", "schedule", "epoch"), [(1, "constant", 1), (2, "linear", 2), (1, "exp", 3)])
def test_nso_gradient_is_the_mean_of_the_mirrored_gradients(k: int, schedule: str, epoch: int) -> None:
    model = make_net()
    reg = _nso(model, k=k, sigma=0.05, schedule=schedule, bn_stats="frozen")
    twin, state = copy.deepcopy(model), reg.ctx.generator.get_state()
    _, grads = run_gradient(reg, model, epoch)
    sigma = sigma_at(reg.cfg, epoch, 4)
    expected = _mean_perturbed_grad(twin, hand_noise(twin, state, sigma, k))
    assert_all_close(grads, expected)
    clean = grad_at(twin, *batch(), zeros_like_params(twin))
    assert not torch.allclose(grads[0], clean[0])  # the noise matters at this σ


def test_nso_lambda_mixes_in_the_clean_gradient() -> None:
    model = make_net()
    reg = _nso(model, k=1, sigma=0.05, lam=0.25)
    twin, state = copy.deepcopy(model), reg.ctx.generator.get_state()
    closure, grads = run_gradient(reg, model)
    clean = grad_at(twin, *batch(), zeros_like_params(twin))
    noisy = _mean_perturbed_grad(twin, hand_noise(twin, state, 0.05, 1))
    assert_all_close(grads, [0.25 * c + 0.75 * n for c, n in zip(clean, noisy, strict=True)])
    assert closure.calls == [True, True, True]


@pytest.mark.parametrize(
    ("cfg", "calls"),
    [
        ({"k": 1}, [True] * 2),
        ({"k": 3, "bn_stats": "frozen"}, [True] * 6),
        ({"k": 2, "bn_stats": "clean_forward"}, [False] + [True] * 4),  # +1 no-grad forward at W
    ],
)
def test_nso_pass_count(cfg: dict[str, Any], calls: list[bool]) -> None:
    model = make_net()
    closure, _ = run_gradient(_nso(model, **cfg), model)
    assert closure.calls == calls


def test_nso_restores_the_weights_exactly() -> None:
    """W after the ± passes is bit-identical to W before ((W + U) − U would not be, in float32)."""
    model = make_net(torch.float32)
    reg = _nso(model, k=2, sigma=0.3)
    before = [p.detach().clone() for p in model.parameters()]
    run_gradient(reg, model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_nso_leaves_unreached_parameters_without_gradient() -> None:
    """Like a plain step: the optimizer skips (no weight decay, no moments) what the loss never reached."""
    model = make_net()
    model.unused = nn.Linear(2, 2).double()
    run_gradient(_nso(model, k=1, lam=0.5), model)
    assert model.unused.weight.grad is None and model.fc.weight.grad is not None


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_nso_frozen_leaves_batchnorm_statistics_unchanged(lam: float) -> None:
    model = make_net()
    before = bn_stats(model)
    run_gradient(_nso(model, k=2, sigma=0.05, lam=lam, bn_stats="frozen"), model)  # λ > 0: clean pass too
    assert_all_close(bn_stats(model), before, tol=0.0)


def test_nso_pair_mean_averages_the_statistics_of_the_passes() -> None:
    model = make_net()
    reg = _nso(model, k=1, sigma=0.2, bn_stats="pair_mean")
    twin, state = copy.deepcopy(model), reg.ctx.generator.get_state()
    run_gradient(reg, model)
    (u,) = hand_noise(twin, state, 0.2, 1)
    x, _ = batch()
    plus = bn_stats_after_forward(twin, x, u)
    minus = bn_stats_after_forward(twin, x, [-t for t in u])
    expected = [p if p.dtype == torch.long else (p + m) / 2 for p, m in zip(plus, minus, strict=True)]
    assert_all_close(bn_stats(model), expected)
    clean = bn_stats_after_forward(twin, x, zeros_like_params(twin))
    assert not torch.allclose(bn_stats(model)[1], clean[1], atol=1e-6)  # σ = 0.2 is visible


def test_nso_pair_mean_with_tiny_sigma_matches_the_clean_update() -> None:
    model = make_net()
    twin = copy.deepcopy(model)
    run_gradient(_nso(model, k=1, sigma=1e-7, bn_stats="pair_mean"), model)
    clean = bn_stats_after_forward(twin, batch()[0], zeros_like_params(twin))
    assert_all_close(bn_stats(model), clean, tol=1e-9)


def test_nso_clean_forward_sets_the_clean_statistics() -> None:
    model = make_net()
    twin = copy.deepcopy(model)
    run_gradient(_nso(model, k=1, sigma=0.2, bn_stats="clean_forward"), model)
    clean = bn_stats_after_forward(twin, batch()[0], zeros_like_params(twin))
    assert_all_close(bn_stats(model), clean, tol=0.0)


def test_sigma_schedules() -> None:
    def at(schedule: str, epoch: int, epochs: int = 5) -> float:
        return sigma_at(NSOConfig(sigma=0.01, schedule=schedule), epoch, epochs)  # type: ignore[arg-type]

    assert [at("constant", e) for e in (1, 3, 5)] == [0.01] * 3
    assert [at("linear", e) for e in (1, 2, 3, 5)] == pytest.approx([0.002, 0.0025, 0.005, 0.01])
    assert at("exp", 1) == pytest.approx(1e-5)
    assert at("exp", 3) == pytest.approx(math.sqrt(1e-5 * 0.01))  # geometric midpoint
    assert at("exp", 5) == pytest.approx(0.01)
    assert at("linear", 1, epochs=1) == 0.01


# -- SAM ----------------------------------------------------------------------------------------------------


def test_sam_gradient_is_taken_at_the_ascent_point() -> None:
    model = make_net()
    reg = SAM(SAMConfig(enabled=True, rho=0.1))
    reg.setup(make_ctx(model))
    twin = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    closure, grads = run_gradient(reg, model)
    x, y = batch()
    g = grad_at(twin, x, y, zeros_like_params(twin))
    norm = torch.sqrt(sum((t**2).sum() for t in g))  # type: ignore[arg-type]
    assert_all_close(grads, grad_at(twin, x, y, [0.1 * t / norm for t in g]))
    assert closure.calls == [True, True]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    clean = bn_stats_after_forward(twin, x, zeros_like_params(twin))
    assert_all_close(bn_stats(model), clean, tol=0.0)  # only the clean pass updates BN statistics


# -- registry ------------------------------------------------------------------------------------------------


def test_build_regularizers_follows_the_enabled_sections() -> None:
    cfg = RunConfig().replace(**{"constraint.enabled": True, "nso.enabled": True, "self_label.enabled": True})
    assert [r.name for r in build_regularizers(cfg)] == ["constraint", "self_label", "nso"]
    assert build_regularizers(RunConfig()) == []


def test_regularizer_hooks_default_to_no_ops() -> None:
    reg = NSO(NSOConfig())
    assert reg.sample_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)) is None
    assert reg.reduce(torch.zeros(2), 1) is None and reg.penalty() is None and reg.end_epoch(1) == {}
