"""The noise matrix a run uses: the estimators on synthetic probabilities, and a run that must
never read the injected F when ``task.noise.reveal`` is false."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from trainables import transition as tr
from trainables.config import NoiseConfig, RunConfig
from trainables.data import Split, TaskData
from trainables.loop import train_to_end
from trainables.noise import apply_noise, pair_transition, symmetric_transition

TRUE_F = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.15, 0.15, 0.7]])
TOLERANCE = 0.05  # ‖F̂ − F‖_max on 3,000 samples with near-perfect noisy posteriors


def _noisy_labels(clean: np.ndarray, transition: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.choice(len(transition), p=transition[c]) for c in clean])


def _posteriors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy-label posteriors p = c·F[y] + (1 − c)/K of a good model (c ~ U(0.8, 1)), and noisy labels."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 3, size=n)
    c = rng.uniform(0.8, 1.0, size=(n, 1))
    return c * TRUE_F[clean] + (1 - c) / 3, _noisy_labels(clean, TRUE_F, rng)


@pytest.mark.parametrize("method", ["anchor", "confident"])
def test_estimators_recover_a_known_f_from_noisy_label_posteriors(method: str) -> None:
    probs, noisy = _posteriors(3000, seed=0)
    est = tr.estimate_from_probabilities(probs, noisy, method)
    np.testing.assert_allclose(est.sum(axis=1), 1.0)
    assert np.abs(est - TRUE_F).max() < TOLERANCE


def test_dual_t_recovers_f_through_the_predicted_class_of_a_confident_model() -> None:
    """Dual-T factorises F through the predicted class: with a confident clean model (posteriors
    ≈ one-hot, T_anchor ≈ I) the counts (predicted → noisy) carry F."""
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 3, size=3000)
    noisy = _noisy_labels(clean, TRUE_F, rng)
    eps = rng.uniform(0.0, 0.1, size=(3000, 1))
    probs = (1 - eps) * np.eye(3)[clean] + eps * rng.dirichlet(np.ones(3), size=3000)
    assert np.abs(tr.estimate_from_probabilities(probs, noisy, "dual_t") - TRUE_F).max() < TOLERANCE


def test_anchor_points_skip_overconfident_outliers() -> None:
    """1 % of samples are over-confident one-hot outliers; without the 97th-percentile filter they
    would be the anchors and the estimate would be ≈ I."""
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 3, size=600)
    c = rng.uniform(0.5, 1.0, size=(600, 1))
    probs = c * TRUE_F[clean] + (1 - c) / 3
    outliers = rng.choice(600, size=6, replace=False)
    probs[outliers] = 0.98 * np.eye(3)[clean[outliers]] + 0.01
    assert np.abs(tr.anchor_transition(probs, probs.argmax(axis=1)) - TRUE_F).max() < 0.03


def test_small_entries_are_snapped_to_zero_and_rows_stay_distributions() -> None:
    probs, noisy = _posteriors(3000, seed=2)
    probs = probs.copy()
    probs[:, 2] = probs[:, 2] * 0.05  # class 2 is (almost) never predicted …
    probs /= probs.sum(axis=1, keepdims=True)
    est = tr.estimate_from_probabilities(probs, noisy, "anchor")
    assert ((est == 0) | (est >= tr.SNAP)).all()
    np.testing.assert_allclose(est.sum(axis=1), 1.0)


def test_out_of_fold_probabilities_never_score_a_sample_with_its_own_label() -> None:
    """Features carry no information: a model that saw the labels would fit them; out of fold it cannot."""
    rng = np.random.default_rng(3)
    feats, noisy = rng.normal(size=(200, 50)), rng.integers(0, 4, size=200)
    probs = tr.out_of_fold_probabilities(feats, noisy, 4, seed=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == noisy).mean() < 0.4  # chance is 0.25; in-sample would be ≫


# -- the run's F ------------------------------------------------------------------------------------
K = 5


def _split(n: int, gen: torch.Generator, rate: float, seed: int) -> Split:
    clean = torch.arange(n) % K
    prototypes = torch.randn(K, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = prototypes[clean] + 0.8 * torch.randn(n, 3, 16, 16, generator=gen)
    noisy = apply_noise(clean.numpy(), K, NoiseConfig(rate=rate), np.random.default_rng(seed))
    return Split(x, clean, torch.from_numpy(noisy))


def _task(transition: np.ndarray | None) -> TaskData:
    """The same images and labels (20 % symmetric noise) whatever ``transition`` claims."""
    gen = torch.Generator().manual_seed(0)
    train, val, test = _split(60, gen, 0.2, 1), _split(20, gen, 0.2, 2), _split(20, gen, 0.0, 3)
    return TaskData(train, val, test, test.labels.clone(), K, transition)


def _config(reveal: bool) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"name": "test_resnet", "pretrained": "none"},
            "task": {"noise": {"kind": "symmetric", "rate": 0.2, "reveal": reveal}},
            "optim": {"lr": 3e-3, "batch_size": 16},
            "consistent": {"enabled": True, "transition": "task"},
            "measure": {"samples": 32, "trace": False, "eigenvalue": False},
            "epochs": 2,
            "device": "cpu",
        }
    )


def _final(cfg: RunConfig, data: TaskData) -> tuple[dict[str, float], dict[str, str]]:
    tr._CACHE.clear()  # a cached estimate would hide a read of the injected F
    last = train_to_end(cfg, data=data, log=lambda _: None)[-1]
    return last.metrics, last.records


TIMING = ("epoch_s", "eval_s", "measure_s")


def _comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in (*TIMING, "f_error")}


def test_with_reveal_false_no_trained_or_selected_number_depends_on_the_injected_f() -> None:
    """The same run with the true F and with a wrong one claimed as injected: every metric but
    ``f_error`` (evaluation of the estimate) is identical, so nothing read the injected F."""
    right, records = _final(_config(reveal=False), _task(symmetric_transition(K, 0.2)))
    wrong, _ = _final(_config(reveal=False), _task(pair_transition(K, 0.45)))
    assert records["transition"] == "estimated:confident"
    assert _comparable(right) == _comparable(wrong)
    assert {"val_acc_corr", "noise_entropy", "bound"} <= set(right)
    assert right["f_error"] != wrong["f_error"] and 0 <= right["f_error"] <= 1


def test_with_reveal_true_the_injected_f_is_used_which_the_swap_detects() -> None:
    """The control for the test above: when F may be read, swapping it changes the run."""
    right, records = _final(_config(reveal=True), _task(symmetric_transition(K, 0.2)))
    wrong, _ = _final(_config(reveal=True), _task(pair_transition(K, 0.45)))
    assert records["transition"] == "true" and "f_error" not in right
    assert right["val_acc_corr"] != wrong["val_acc_corr"] and right["train_loss"] != wrong["train_loss"]


def test_without_injected_noise_the_run_estimates_f_and_reports_no_error() -> None:
    cfg = _config(reveal=True).replace(**{"task.noise.kind": "none", "task.noise.rate": 0.0})
    metrics, records = _final(cfg, _task(None))
    assert records["transition"] == "estimated:confident" and "f_error" not in metrics
    assert 0 <= metrics["noise_entropy"] <= np.log(K)


def test_consistent_estimated_forces_the_estimate_even_when_f_is_revealed() -> None:
    cfg: Any = _config(reveal=True).replace(**{"consistent.transition": "estimated"})
    metrics, records = _final(cfg, _task(symmetric_transition(K, 0.2)))
    assert records["transition"] == "estimated:confident" and "f_error" in metrics


# -- guards: an ill-conditioned F is never inverted for selection ---------------------------------------


def test_an_ill_conditioned_f_makes_trials_report_plain_val_acc_as_val_acc_corr() -> None:
    from trainables.noise import CORRECTION_MAX_COND, correction_is_stable

    near_singular = symmetric_transition(K, 0.75)  # eigenvalues 1 and 1 − 0.75·5/4 = 0.0625: cond 16
    assert np.linalg.cond(near_singular) > CORRECTION_MAX_COND and not correction_is_stable(near_singular)
    assert correction_is_stable(symmetric_transition(K, 0.4)) and correction_is_stable(pair_transition(K, 0.4))
    metrics, _ = _final(_config(reveal=True).replace(**{"consistent.enabled": False}), _task(near_singular))
    assert metrics["val_acc_corr_fallback"] == 1.0 and metrics["val_acc_corr"] == metrics["val_acc"]
    metrics, _ = _final(_config(reveal=True).replace(**{"consistent.enabled": False}), _task(pair_transition(K, 0.4)))
    assert metrics["val_acc_corr_fallback"] == 0.0 and metrics["val_acc_corr"] != metrics["val_acc"]


def test_the_report_says_when_val_acc_corr_fell_back_and_what_measure_alone_is() -> None:
    import pandas as pd

    from tuning.report import format_report

    table = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c"],
            "val_acc": [0.5, 0.6, 0.55],
            "val_acc_corr": [0.5, 0.6, 0.55],
            "val_acc_corr_fallback": [1.0, 1.0, 1.0],
            "measure": [0.01, 0.3, 0.2],
            "bound": [1.0, 1.2, 1.1],
            "test_acc": [0.4, 0.9, 0.8],
        }
    )
    text = format_report(table, "val_acc_corr")
    assert "ill-conditioned" in text and "measure alone" not in text
    assert "measure alone predicts the generalization gap" in format_report(table, "measure")
    assert "ill-conditioned" not in format_report(table.drop(columns="val_acc_corr_fallback"), "val_acc")


# -- the noise case the end-of-sweep report names ---------------------------------------------------


def test_noise_structure_is_zero_for_symmetric_one_for_pair_and_undefined_without_a_choice() -> None:
    from trainables.noise import noise_rate, noise_structure

    assert noise_structure(symmetric_transition(K, 0.4)) == pytest.approx(0.0)
    assert noise_structure(pair_transition(K, 0.4)) == pytest.approx(1.0)
    assert noise_rate(symmetric_transition(K, 0.4)) == pytest.approx(0.4)
    half = 0.5 * (symmetric_transition(K, 0.4) + pair_transition(K, 0.4))  # each row: 0.25 + 0.75·0.25 on one class
    assert 0.0 < noise_structure(half) < 1.0
    assert np.isnan(noise_structure(np.eye(K))) and np.isnan(noise_structure(symmetric_transition(2, 0.3)))


def test_trials_report_the_noise_rate_and_structure_of_the_f_they_used() -> None:
    metrics, _ = _final(_config(reveal=True), _task(pair_transition(K, 0.3)))
    assert metrics["f_noise_rate"] == pytest.approx(0.3) and metrics["f_structure"] == pytest.approx(1.0)
    metrics, _ = _final(_config(reveal=False), _task(pair_transition(K, 0.3)))  # the estimate's, not the truth's
    assert metrics["f_structure"] != pytest.approx(1.0) or metrics["f_noise_rate"] != pytest.approx(0.3)
    assert 0.0 <= metrics["f_structure"] <= 1.0


def _case_table(rate: float, structure: float | None, *, revealed: bool) -> Any:
    import pandas as pd

    from trainables.config import RunConfig

    flat = RunConfig().to_flat() | {"task.noise.kind": "pair", "task.noise.rate": 0.3, "task.noise.reveal": revealed}
    params = {k: str(v) for k, v in flat.items()}
    table = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c"],
            "val_acc": [0.5, 0.6, 0.55],
            "test_acc": [0.4, 0.9, 0.8],
            "f_noise_rate": [rate, rate + 0.01, rate - 0.01],
            "params": [params] * 3,
        }
    )
    if structure is not None:
        table["f_structure"] = [structure, structure + 0.02, structure - 0.02]
    return table


def test_the_report_names_the_noise_case_from_the_f_the_trials_used() -> None:
    from tuning.report import format_report, noise_case
    from tuning.selection import STRUCTURE_CUT

    symmetric = "\n".join(noise_case(_case_table(0.4, 0.1, revealed=False)))
    assert "about 40% of the training labels wrong" in symmetric and "symmetric-like" in symmetric
    assert "F estimated from the training labels" in symmetric
    dependent = "\n".join(noise_case(_case_table(0.3, STRUCTURE_CUT + 0.1, revealed=True)))
    assert "class-dependent" in dependent and "the injected F" in dependent
    assert "little noise" in "\n".join(noise_case(_case_table(0.02, 0.5, revealed=False)))
    assert "two classes" in "\n".join(noise_case(_case_table(0.3, None, revealed=False)))
    assert noise_case(_case_table(0.3, 0.5, revealed=False).drop(columns="f_noise_rate")) == []
    assert "class-dependent" in format_report(_case_table(0.3, 0.6, revealed=False), "val_acc")
    with_split = _case_table(0.4, 0.1, revealed=False).assign(n_val=200.0)
    assert "the default selection is val_acc" in "\n".join(noise_case(with_split))
    no_split = with_split.assign(n_val=0.0)
    assert "Without a validation split the default selection is bound" in "\n".join(noise_case(no_split))
