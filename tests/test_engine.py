"""The engine end to end: model factory and starting weights, and the training loop.

Runs use timm's ``test_resnet`` from random init (``model.pretrained: none``) on a tiny synthetic
task (5 classes, 40 training images of 3×16×16), with the Hessian measures off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from torch import nn

from trainables import loop, models
from trainables.config import ConfigError, ModelConfig, NoiseConfig, RunConfig, TaskConfig
from trainables.data import Split, TaskData
from trainables.loop import DivergedError, fine_tune, train_to_end
from trainables.models import create_model, ensure_source_model, layer_groups, save_weights
from trainables.noise import apply_noise, symmetric_transition

K = 5
TIMING = {"epoch_s", "eval_s"}


def _split(n: int, gen: torch.Generator, noise_rate: float = 0.0) -> Split:
    clean = torch.arange(n) % K
    prototypes = torch.randn(K, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = prototypes[clean] + 0.8 * torch.randn(n, 3, 16, 16, generator=gen)
    return Split(x, clean, torch.from_numpy(_noisy(clean, noise_rate, seed=n)))


def _noisy(clean: torch.Tensor, rate: float, seed: int) -> np.ndarray:
    if rate == 0:
        return clean.numpy().copy()
    return apply_noise(clean.numpy(), K, NoiseConfig(rate=rate), np.random.default_rng(seed))


@pytest.fixture(scope="module")
def task() -> TaskData:
    """5 learnable classes; 20% symmetric noise on train and val, clean test."""
    gen = torch.Generator().manual_seed(0)
    train, val, test = _split(40, gen, 0.2), _split(10, gen, 0.2), _split(15, gen)
    test_noisy = torch.from_numpy(_noisy(test.clean, 0.2, seed=1))
    return TaskData(train, val, test, test_noisy, K, symmetric_transition(K, 0.2))


def config(**flat: Any) -> RunConfig:
    base = RunConfig.from_dict(
        {
            "model": {"name": "test_resnet", "pretrained": "none"},
            "task": {"noise": {"kind": "symmetric", "rate": 0.2}},
            "optim": {"name": "adam", "lr": 3e-3, "batch_size": 16},
            "measure": {"enabled": False},
            "epochs": 2,
            "device": "cpu",
        }
    )
    return base.replace(**flat)


FULL = {  # every regularizer that changes the loop's behaviour, active from epoch 1
    "constraint.enabled": True,
    "constraint.radius": 0.5,
    "constraint.growth": 1.5,
    "self_label.enabled": True,
    "self_label.correct_start": 1,
    "self_label.threshold": 0.5,
    "self_label.reweight_start": 1,
    "nso.enabled": True,
    "nso.sigma": 0.01,
    "optim.schedule": "step",
    "optim.step_size": 1,
    "optim.gamma": 0.5,
}


def metrics(results: list[loop.EpochResult]) -> list[dict[str, float | None]]:
    """Per-epoch metrics without wall-clock timings; NaN (e.g. an undefined precision) becomes None."""
    return [{k: None if v != v else v for k, v in r.metrics.items() if k not in TIMING} for r in results]


def run(task: TaskData, **flat: Any) -> list[dict[str, float | None]]:
    return metrics(train_to_end(config(**flat), data=task, log=lambda _: None))


# -- models -----------------------------------------------------------------------------------------------


def _body_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))


def _source_state(num_classes: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return timm.create_model("test_resnet", num_classes=num_classes).state_dict()


def test_file_weights_from_safetensors(tmp_path: Path) -> None:
    state = _source_state()
    save_weights(state, tmp_path / "w.safetensors")
    model = create_model(ModelConfig(pretrained=f"file:{tmp_path / 'w.safetensors'}"), num_classes=K)
    assert _body_equal(model, state)
    assert model.state_dict()["fc.weight"].shape[0] == K  # a fresh head for the target classes


@pytest.mark.parametrize("wrapped", [False, True])
def test_file_weights_from_a_torch_file(tmp_path: Path, wrapped: bool) -> None:
    state = _source_state()
    torch.save({"state_dict": state} if wrapped else state, tmp_path / "w.pt")
    model = create_model(ModelConfig(pretrained=f"file:{tmp_path / 'w.pt'}"), num_classes=K)
    assert _body_equal(model, state)


def test_file_weights_shape_mismatch(tmp_path: Path) -> None:
    state = _source_state()
    state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    save_weights(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match=r"shape mismatch at layer1\.0\.conv1\.weight"):
        create_model(ModelConfig(pretrained=f"file:{tmp_path / 'bad.safetensors'}"), num_classes=K)


def test_file_weights_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothing\.pt'? does not exist"):
        create_model(ModelConfig(pretrained=f"file:{tmp_path / 'nothing.pt'}"), num_classes=K)


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet_does_not_exist'"):
        create_model(ModelConfig(name="resnet_does_not_exist", pretrained="none"), num_classes=K)


def test_source_model_is_pretrained_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, tuple[int, ...]]] = []

    def fake_pretrain(name: str, source: Any, recipe: dict[str, Any], **_: Any) -> nn.Module:
        calls.append((name, int(source.x.shape[-1]), source.classes))
        torch.manual_seed(1)
        return timm.create_model(name, num_classes=len(source.classes)).eval()

    monkeypatch.setenv("HESSTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_pretrain_source", fake_pretrain)
    small, large = TaskConfig(image_size=16), TaskConfig(image_size=32)
    first = ensure_source_model("test_resnet", small, log=lambda _: None)
    mtime = first.stat().st_mtime_ns
    second = ensure_source_model("test_resnet", small, log=lambda _: None)
    assert first == second and first.parent == tmp_path and second.stat().st_mtime_ns == mtime
    assert calls == [("test_resnet", 16, (0, 1, 2, 3, 4))]
    report = json.loads(first.with_suffix(".json").read_text())  # digits has no held-out source images
    assert report["source_test_acc"] is None and 0 <= report["probe_acc_random"] <= 1 and report["probe_train_n"] > 0
    ensure_source_model("test_resnet", large, log=lambda _: None)  # another image size: another entry
    other = TaskConfig(image_size=16, source_classes=(0, 1, 2), target_classes=(5, 6, 7))
    ensure_source_model("test_resnet", other, log=lambda _: None)  # other source classes: another entry
    assert [c[1:] for c in calls] == [(16, (0, 1, 2, 3, 4)), (32, (0, 1, 2, 3, 4)), (16, (0, 1, 2))]
    model = create_model(ModelConfig(pretrained="source"), num_classes=K, task=small)
    assert len(calls) == 3 and _body_equal(model, models.load_weights(first))


def test_layer_groups_are_depth_ordered_weights() -> None:
    groups = layer_groups(timm.create_model("test_resnet", num_classes=K))
    assert groups.head == ("fc.weight",)
    assert [g[0].split(".")[0] for g in groups.groups] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    names = [n for g in groups.groups for n in g]
    assert all(n.endswith("weight") and "bn" not in n for n in names)


def test_every_classifier_head_is_a_head_and_timm_orders_the_groups() -> None:
    """A distilled transformer has two heads (``head``, ``head_dist``): both are constrained as
    heads, trained at the head's lr, and skipped when a backbone is loaded. timm's grouping puts
    EfficientNet's ``conv_head`` (the last conv) in the deepest group, not after the stem."""
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=K, pretrained=False, img_size=32)
    assert models.head_names(deit) == ("head", "head_dist")
    groups = layer_groups(deit)
    assert groups.head == ("head.weight", "head_dist.weight")
    assert not any(n.startswith("head") for g in groups.groups for n in g)
    cfg = RunConfig().replace(**{"optim.head_lr_mult": 10.0})
    fast = loop._optimizer(cfg, deit).param_groups[1]["params"]
    assert {id(p) for p in fast} == {id(p) for n, p in deit.named_parameters() if n.startswith("head")}
    effnet = layer_groups(timm.create_model("efficientnet_b0", num_classes=K, pretrained=False))
    assert effnet.groups[0] == ("conv_stem.weight",) and effnet.groups[-1][-1] == "conv_head.weight"


# -- the loop ----------------------------------------------------------------------------------------------


def test_same_seed_same_metrics(task: TaskData) -> None:
    first, second = run(task, **FULL), run(task, **FULL)
    assert first == second
    assert first[0]["train_objective"] != first[1]["train_objective"]


def test_different_seed_different_metrics(task: TaskData) -> None:
    assert run(task, seed=0)[-1]["train_objective"] != run(task, seed=1)[-1]["train_objective"]


def test_resume_after_epoch_one_matches_an_uninterrupted_run(task: TaskData) -> None:
    cfg = config(**FULL)
    full, state = [], None
    for result in fine_tune(cfg, data=task, log=lambda _: None):
        full.append(result)
        if result.epoch == 1:
            state = result.state()
    resumed = list(fine_tune(cfg, data=task, resume=state, log=lambda _: None))
    assert [r.epoch for r in resumed] == [2]
    want, got = metrics(full)[1], metrics(resumed)[0]
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (None if value is None else pytest.approx(value, rel=1e-6, abs=1e-6)), key


def test_nan_loss_raises_diverged_error(task: TaskData) -> None:
    bad = TaskData(
        Split(task.train.x * math.nan, task.train.clean, task.train.labels),
        task.val,
        task.test,
        task.test_noisy,
        K,
        task.transition,
    )
    with pytest.raises(DivergedError, match=r"lower optim\.lr"):
        train_to_end(config(), data=bad, log=lambda _: None)


def test_huge_learning_rate_diverges(task: TaskData) -> None:
    with pytest.raises(DivergedError):
        cfg = config(**{"optim.name": "sgd", "optim.lr": 1e12, "epochs": 3})
        train_to_end(cfg, data=task, log=lambda _: None)


@pytest.mark.parametrize(
    ("flat", "forward", "backward"),
    [
        ({}, 1.0, 1.0),
        ({"nso.enabled": True, "nso.k": 2}, 4.0, 4.0),
        ({"nso.enabled": True, "nso.bn_stats": "clean_forward"}, 3.0, 2.0),
        ({"nso.enabled": True, "nso.lam": 0.5}, 3.0, 3.0),
        ({"sam.enabled": True}, 2.0, 2.0),
    ],
)
def test_passes_per_step(task: TaskData, flat: dict[str, Any], forward: float, backward: float) -> None:
    (m,) = run(task, epochs=1, **flat)
    assert (m["forward_passes_per_step"], m["backward_passes_per_step"]) == (forward, backward)


def test_constraint_keeps_every_tensor_in_its_ball(task: TaskData) -> None:
    cfg = config(
        **{
            "constraint.enabled": True,
            "constraint.radius": 0.05,
            "constraint.growth": 2.0,
            "constraint.head_radius": 0.1,
            "optim.lr": 0.05,
            "epochs": 1,
        }
    )
    (result,) = train_to_end(cfg, data=task, log=lambda _: None)
    state = result.state()
    groups = layer_groups(create_model(cfg.model, K))
    for g, names in enumerate(groups.groups):
        for name in names:
            dist = float((state["model"][name] - state["reference"][name]).norm())
            assert dist <= 0.05 * 2.0**g * (1 + 1e-5), name
    assert float((state["model"]["fc.weight"] - state["reference"]["fc.weight"]).norm()) <= 0.1 * (1 + 1e-5)
    assert result.metrics["dist/g0"] > 0


def test_metrics_use_clean_test_labels_and_noisy_val_labels(task: TaskData) -> None:
    cfg = config(epochs=1)
    (result,) = train_to_end(cfg, data=task, log=lambda _: None)
    model = create_model(cfg.model, K)
    model.load_state_dict(result.state()["model"])
    m = result.metrics

    def acc(x: torch.Tensor, labels: torch.Tensor) -> float:
        return float((models.predict(model, x).argmax(1) == labels).float().mean())

    assert m["test_acc"] == pytest.approx(acc(task.test.x, task.test.clean))
    assert m["test_acc_noisy"] == pytest.approx(acc(task.test.x, task.test_noisy))
    assert task.val is not None and m["val_acc"] == pytest.approx(acc(task.val.x, task.val.labels))
    assert m["train_acc"] == pytest.approx(acc(task.train.x, task.train.labels))
    assert m["gap"] == pytest.approx(m["test_loss_noisy"] - m["train_loss"])
    assert m["gap_clean"] == pytest.approx(m["test_loss"] - m["train_loss"])
    assert task.transition is not None  # the fixture's task is noisy
    pred = models.predict(model, task.val.x).argmax(1).numpy()
    corrected = np.linalg.inv(task.transition)[task.val.labels.numpy(), pred].mean()
    assert m["val_acc_corr"] == pytest.approx(corrected)
    assert m["n_val"] == len(task.val) and m["n_train"] == len(task.train)
    # bound_floor's H_F: the closed form of symmetric noise, −(1 − r) log(1 − r) − r log(r/(K − 1))
    assert m["noise_entropy"] == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2 / (K - 1))))


def test_consistent_loss_reports_its_objective_and_the_clean_gap(task: TaskData) -> None:
    (result,) = train_to_end(config(epochs=1, **{"consistent.enabled": True}), data=task, log=lambda _: None)
    m = result.metrics
    assert m["train_loss"] != pytest.approx(m["train_ce"])  # the backward-corrected loss, not CE
    assert m["gap"] == pytest.approx(m["test_loss"] - m["train_loss"])


# -- configuration errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"optim.lrr": 1.0}, "unknown key optim.lrr"),
        ({"task.noise.rate": 1.0}, r"task.noise.rate=1.0 is outside \[0, 1\)"),
        ({"nso.sigma": 0.0}, r"nso.sigma=0.0 must be > 0"),
        ({"nso.sigma": -0.1}, r"nso.sigma=-0.1 must be > 0"),
        ({"nso.k": 0}, r"nso.k=0 must be ≥ 1"),
        ({"nso.enabled": True, "sam.enabled": True}, "enable one of them"),
    ],
)
def test_invalid_configs_are_rejected(flat: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**flat)


def test_singular_transition_is_rejected_before_training(task: TaskData) -> None:
    cfg = config(**{"consistent.enabled": True, "task.noise.rate": 0.8})  # (K − 1)/K for K = 5
    with pytest.raises(ConfigError, match="singular"):
        next(fine_tune(cfg, data=task, log=lambda _: None))


def test_wrong_number_of_group_scales_is_rejected_before_training(task: TaskData) -> None:
    cfg = config(**{"constraint.enabled": True, "constraint.group_scales": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="has 2 values but the model has 5 depth groups"):
        next(fine_tune(cfg, data=task, log=lambda _: None))


def test_head_lr_mult_gives_the_head_weights_and_bias_their_own_learning_rate(task: TaskData) -> None:
    prepared = loop.prepare(config(**{"optim.head_lr_mult": 10.0}), task, log=lambda _: None)
    body, head = prepared.optimizer.param_groups
    assert body["lr"] == 3e-3 and head["lr"] == pytest.approx(3e-2)
    named = dict(prepared.model.named_parameters())
    assert {id(p) for p in head["params"]} == {id(named["fc.weight"]), id(named["fc.bias"])}
    assert len(body["params"]) + 2 == len(named)
    assert len(loop.prepare(config(), task, log=lambda _: None).optimizer.param_groups) == 1  # default: as before
    faster = run(task, epochs=1, **{"optim.head_lr_mult": 10.0})[-1]["train_objective"]
    assert faster != run(task, epochs=1)[-1]["train_objective"]
    with pytest.raises(ConfigError, match=r"optim\.head_lr_mult=0"):
        config(**{"optim.head_lr_mult": 0.0}).validate()


def test_measure_model_reports_every_measure_and_what_it_cost(task: TaskData) -> None:
    from trainables.measures import measure_model

    cfg = config(
        epochs=1,
        **{
            "measure.samples": 24,
            "measure.eigen_samples": 16,
            "measure.eigen_iters": 30,
            "measure.trace_max_probes": 8,
        },
    )
    (result,) = train_to_end(cfg, data=task, log=lambda _: None)
    prepared = loop.prepare(cfg, task, log=lambda _: None)
    prepared.model.load_state_dict(result.state()["model"])
    out = measure_model(prepared.model, prepared.ctx.reference, task, cfg, transition=task.transition)
    assert out["measure_samples"] == 24
    assert out["bound"] == pytest.approx(out["bound_loss"] + math.sqrt(out["bound_C"]) * out["measure"])
    assert out["trace_se"] >= 0 and out["lambda_max"] > 0
    assert 1 <= out["lambda_max_iters"] < 30  # Lanczos stopped on its residual (measure.eigen_rel_tol)
    exact = measure_model(
        prepared.model,
        prepared.ctx.reference,
        task,
        cfg.replace(**{"measure.eigen_rel_tol": 0.0}),
        transition=task.transition,
    )
    assert exact["lambda_max_iters"] == 30
    # the early-stopped value agrees with 30 full iterations within the residual it states
    assert abs(out["lambda_max"] - exact["lambda_max"]) <= out["lambda_max_residual"] <= 1e-2 * out["lambda_max"]


def test_the_final_epoch_records_which_validation_samples_the_model_gets_right(task: TaskData) -> None:
    results = train_to_end(config(epochs=2), data=task, log=lambda _: None)
    assert results[0].records == {} and task.val is not None
    model = create_model(ModelConfig("test_resnet", "none"), K)
    model.load_state_dict(results[-1].state()["model"])
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(results[-1].records["val_correct"]), dtype=np.uint8))
    correct = (models.predict(model, task.val.x).argmax(1) == task.val.labels).numpy()
    np.testing.assert_array_equal(bits[: len(task.val)].astype(bool), correct)
    assert correct.mean() == pytest.approx(results[-1].metrics["val_acc"])
    predicted = [int(c) for c in results[-1].records["val_pred"]]  # one digit per sample (K ≤ 10)
    np.testing.assert_array_equal(predicted, models.predict(model, task.val.x).argmax(1).numpy())


def test_evaluating_only_some_epochs_trains_the_same_model(task: TaskData) -> None:
    """The study evaluates its checkpoints only: the evaluated epochs' numbers must be exactly
    those of a run that evaluates every epoch."""
    cfg = config(epochs=3, **FULL)
    every = train_to_end(cfg, data=task, log=lambda _: None)
    some = train_to_end(cfg, data=task, log=lambda _: None, evaluate_at=(2,))
    assert "test_acc" not in some[0].metrics and "train_objective" in some[0].metrics
    for i in (1, 2):  # epoch 2 (asked for) and 3 (the last, always)
        untimed = {k: v for k, v in every[i].metrics.items() if k not in TIMING}
        assert untimed == pytest.approx(
            {k: v for k, v in some[i].metrics.items() if k not in TIMING}, rel=0, abs=0, nan_ok=True
        )


def test_checkpoint_state_is_checked_against_its_checksum(tmp_path: Path) -> None:
    """What a resumed trial reads: an intact state, or None and the reason (trainables.trainable)."""
    from trainables.trainable import CHECKSUM_FILE, STATE_FILE, read_state, write_state

    state = {"epoch": 3, "model": {"w": torch.arange(6.0)}}
    write_state(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKSUM_FILE, STATE_FILE])  # no temporary left
    read, problem = read_state(tmp_path)
    assert (
        read is not None and problem == "" and read["epoch"] == 3 and torch.equal(read["model"]["w"], torch.arange(6.0))
    )
    data = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    assert read_state(tmp_path) == (None, f"damaged ({STATE_FILE} does not match its checksum)")
    (tmp_path / STATE_FILE).write_bytes(data[:100])  # cut short, and no checksum (older checkpoints)
    (tmp_path / CHECKSUM_FILE).unlink()
    read, problem = read_state(tmp_path)
    assert read is None and problem.startswith("unreadable (")
    (tmp_path / STATE_FILE).write_bytes(data)  # intact, no checksum: read as it is
    assert read_state(tmp_path)[0] is not None
    (tmp_path / STATE_FILE).unlink()
    assert read_state(tmp_path)[1].startswith("unreadable (")


def test_timm_weights_are_looked_up_offline_even_after_the_hub_was_imported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """huggingface_hub fixes its offline flag when first imported; a timm model asked for its
    pretrained weights still looks only in the local cache (no network retries), and a miss is
    the one-line error."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported with the variable unset
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ConfigError, match="not in the local timm/Hugging Face cache"):
        models.create_model(ModelConfig(name="test_resnet", pretrained="timm"), 2)
    assert constants.HF_HUB_OFFLINE is True
