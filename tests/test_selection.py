"""Selection criteria, regret and correlations on hand-built trial tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tuning import selection
from tuning.selection import (
    Criterion,
    correlations,
    expected_regret,
    expected_test_acc,
    get_criterion,
    granulated_kendall,
    kendall_tau,
    leaderboard,
    list_criteria,
    partial_kendall,
    pearson_r,
    rank,
    ranking_agreement,
    register_criterion,
    regret,
    select,
    spearman_rho,
    summary,
)

NAN = math.nan


def _trials() -> list[dict[str, object]]:
    """Four trials: t1/t2 tie on val_acc; t3 has no bound or measure but the best test_acc."""
    return [
        {"trial_id": "t0", "bound": 1.0, "measure": 0.5, "val_acc": 0.8, "val_loss": 0.6, "test_acc": 0.80},
        {"trial_id": "t1", "bound": 2.0, "measure": 0.3, "val_acc": 0.9, "val_loss": 0.5, "test_acc": 0.90},
        {"trial_id": "t2", "bound": 3.0, "measure": 0.4, "val_acc": 0.9, "val_loss": 0.4, "test_acc": 0.85},
        {"trial_id": "t3", "bound": NAN, "measure": NAN, "val_acc": 0.7, "val_loss": 0.3, "test_acc": 0.95},
    ]


# --------------------------------------------------------------------------- registry


def test_builtin_criteria_registered_with_directions() -> None:
    assert {"bound", "measure", "val_acc", "val_loss", "oracle"} <= set(list_criteria())
    assert get_criterion("bound").direction == "min"
    assert get_criterion("val_acc").direction == "max"
    assert get_criterion("oracle").evaluation_only
    assert not get_criterion(selection.DEFAULT_CRITERION).evaluation_only


def test_unknown_criterion_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown criterion 'nope'.*bound.*val_acc"):
        select(_trials(), "nope")


def test_register_criterion(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuning.selection import criteria

    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))
    register_criterion(Criterion("max_train_acc", "train_acc", "max", "highest train accuracy"))
    trials = [{"trial_id": "a", "train_acc": 0.5}, {"trial_id": "b", "train_acc": 0.7}]
    assert select(trials, "max_train_acc") == "b"
    with pytest.raises(ValueError, match="already registered"):
        register_criterion(Criterion("max_train_acc", "train_acc", "min", "dup"))


def test_criterion_rejects_bad_direction() -> None:
    with pytest.raises(ValueError, match="'up'"):
        Criterion("x", "bound", "up", "bad")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [("bound", "t0"), ("measure", "t1"), ("val_acc", "t2"), ("val_loss", "t3")],
)
def test_select_by_hand(criterion: str, expected: str) -> None:
    assert select(_trials(), criterion) == expected


def test_default_criterion_is_bound() -> None:
    assert select(_trials()) == "t0"


def test_rank_skips_nan_metric() -> None:
    assert rank(_trials(), "bound") == ["t0", "t1", "t2"]
    assert rank(_trials(), "val_acc") == ["t2", "t1", "t0", "t3"]


def test_oracle_is_guarded() -> None:
    with pytest.raises(ValueError, match="evaluation only"):
        select(_trials(), "oracle")
    assert select(_trials(), "oracle", allow_oracle=True) == "t3"


def test_val_acc_tie_falls_through_to_bound_when_val_loss_missing() -> None:
    trials = [
        {"trial_id": "a", "val_acc": 0.9, "bound": 2.0},
        {"trial_id": "b", "val_acc": 0.9, "bound": 1.0},
        {"trial_id": "c", "val_acc": 0.8, "bound": 0.5},
    ]
    assert rank(trials, "val_acc") == ["b", "a", "c"]


def test_val_loss_nan_ranks_after_finite_within_tie() -> None:
    trials = [
        {"trial_id": "a", "val_acc": 0.9, "val_loss": NAN, "bound": 0.1},
        {"trial_id": "b", "val_acc": 0.9, "val_loss": 0.7, "bound": 5.0},
    ]
    assert select(trials, "val_acc") == "b"


def test_full_tie_keeps_input_order() -> None:
    trials = [{"trial_id": t, "bound": 1.0} for t in ("z", "y", "x")]
    assert rank(trials, "bound") == ["z", "y", "x"]


def test_select_raises_when_no_trial_has_metric() -> None:
    trials = [{"trial_id": "a", "bound": 1.0}, {"trial_id": "b", "bound": 2.0}]
    with pytest.raises(ValueError, match="no trial has a value for 'val_acc'"):
        select(trials, "val_acc")
    assert math.isnan(regret(trials, "val_acc"))


def test_dataframe_and_records_agree() -> None:
    frame = pd.DataFrame(_trials()).set_index("trial_id", drop=False)
    for criterion in ("bound", "measure", "val_acc", "val_loss"):
        assert rank(frame, criterion) == rank(_trials(), criterion)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"bound": 1.0}], "trial_id"),
        ([{"trial_id": "a", "bound": 1.0}, {"trial_id": "a", "bound": 2.0}], "unique"),
        ([{"trial_id": "a", "bound": "high"}], "'bound' must be numeric"),
    ],
)
def test_bad_tables_rejected(records: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rank(records, "bound")


# --------------------------------------------------------------------------- regret


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [("bound", 0.15), ("measure", 0.05), ("val_acc", 0.10), ("val_loss", 0.0), ("oracle", 0.0)],
)
def test_regret_by_hand(criterion: str, expected: float) -> None:
    assert regret(_trials(), criterion) == pytest.approx(expected)


def test_expected_regret_under_random_tie_breaking() -> None:
    # t1 and t2 tie at val_acc 0.9: expected test_acc = (0.90 + 0.85) / 2; oracle 0.95.
    assert expected_test_acc(_trials(), "val_acc") == pytest.approx(0.875)
    assert expected_regret(_trials(), "val_acc") == pytest.approx(0.075)
    # Without a tie the expectation is the deterministic pick.
    assert expected_regret(_trials(), "bound") == pytest.approx(regret(_trials(), "bound"))


def test_expected_test_acc_three_way_tie_ignores_nan_test_acc() -> None:
    trials = [
        {"trial_id": "a", "val_acc": 0.5, "test_acc": 0.6},
        {"trial_id": "b", "val_acc": 0.5, "test_acc": 0.9},
        {"trial_id": "c", "val_acc": 0.5, "test_acc": NAN},
        {"trial_id": "d", "val_acc": 0.4, "test_acc": 0.3},
    ]
    assert expected_test_acc(trials, "val_acc") == pytest.approx(0.75)
    assert expected_regret(trials, "val_acc") == pytest.approx(0.15)


# --------------------------------------------------------------------------- Kendall, Spearman, Pearson


def test_kendall_by_hand() -> None:
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(2 / 3)  # 5 C, 1 D of 6 pairs
    # tau-b with one pair tied in x: 5 concordant / sqrt((6 - 1) * 6)
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))


def test_kendall_nan_handling() -> None:
    x = [1.0, 2.0, NAN, 3.0, 4.0, math.inf]
    y = [1.0, 2.0, 9.0, 4.0, 3.0, 0.0]
    assert kendall_tau(x, y) == pytest.approx(2 / 3)  # pairs with NaN/inf dropped
    assert math.isnan(kendall_tau([1.0, 2.0, NAN], [1.0, 2.0, 3.0]))  # 2 pairs < 3
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # constant x


def test_kendall_matches_scipy_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(0)
    for n in (5, 17, 60):
        x = rng.integers(0, 6, n).astype(float)
        y = x + rng.normal(0, 2, n).round()
        expected = stats.kendalltau(x, y, variant="b").statistic
        assert kendall_tau(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_and_pearson_match_scipy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=30).round(1)
    y = x**3 + rng.normal(size=30)
    assert spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson_r(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_partial_kendall_by_hand() -> None:
    x, y, z = [1, 2, 3, 4], [1, 2, 4, 3], [2, 1, 3, 4]
    # tau_xy = 2/3, tau_xz = 2/3, tau_yz = (4 - 2)/6 = 1/3
    expected = (2 / 3 - 2 / 3 * 1 / 3) / math.sqrt((1 - 4 / 9) * (1 - 1 / 9))
    assert partial_kendall(x, y, z) == pytest.approx(expected)
    assert expected == pytest.approx(4 / math.sqrt(40))


def test_partial_kendall_degenerate_and_nan() -> None:
    assert math.isnan(partial_kendall([1, 2, 3, 4], [1, 2, 4, 3], [1, 2, 3, 4]))  # tau_xz = 1
    with_nan = partial_kendall([1, 2, 3, 4, 5], [1, 2, 4, 3, NAN], [2, 1, 3, 4, 0])
    assert with_nan == pytest.approx(4 / math.sqrt(40))


def test_correlations_table() -> None:
    trials = [
        {"trial_id": "a", "measure": 1.0, "bound": 4.0, "trace": NAN, "gap": 0.1},
        {"trial_id": "b", "measure": 2.0, "bound": 3.0, "trace": 1.0, "gap": 0.2},
        {"trial_id": "c", "measure": 3.0, "bound": 2.0, "trace": 2.0, "gap": 0.3},
        {"trial_id": "d", "measure": 4.0, "bound": 1.0, "trace": NAN, "gap": 0.4},
    ]
    table = correlations(trials)
    assert list(table.index) == ["measure", "bound", "trace", "lambda_max", "distance"]
    assert list(table.columns) == ["kendall", "spearman", "pearson", "n"]
    assert table.loc["measure", ["kendall", "spearman", "pearson"]].tolist() == pytest.approx([1, 1, 1])
    assert table.loc["bound", ["kendall", "spearman", "pearson"]].tolist() == pytest.approx([-1, -1, -1])
    assert table.loc["trace", "n"] == 2 and math.isnan(table.loc["trace", "kendall"])
    assert table.loc["lambda_max", "n"] == 0
    with pytest.raises(ValueError, match="unknown metric 'gapp'"):
        correlations(trials, target="gapp")


# --------------------------------------------------------------------------- granulated Kendall


def _grid() -> list[dict[str, object]]:
    """lr in {1,2,3} x epochs in {5,10}; psi_lr = (1/3 + (-1))/2 = -1/3, psi_epochs = 1."""
    rows = [
        (1, 5, 1.0, 1.0),
        (2, 5, 2.0, 3.0),
        (3, 5, 3.0, 2.0),  # epochs=5: tau = (2 - 1)/3 = 1/3
        (1, 10, 4.0, 6.0),
        (2, 10, 5.0, 5.0),
        (3, 10, 6.0, 4.0),  # epochs=10: tau = -1
    ]
    trials: list[dict[str, object]] = [
        {"trial_id": f"t{i}", "lr": lr, "epochs": ep, "measure": m, "gap": g} for i, (lr, ep, m, g) in enumerate(rows)
    ]
    trials.append({"trial_id": "nan", "lr": 3, "epochs": 5, "measure": NAN, "gap": 9.0})
    return trials


def test_granulated_kendall_by_hand() -> None:
    result = granulated_kendall(_grid(), "measure", "gap", by=["lr", "epochs"])
    assert result.per_axis["lr"] == pytest.approx(-1 / 3)
    assert result.per_axis["epochs"] == pytest.approx(1.0)
    assert result.mean == pytest.approx(1 / 3)


def test_granulated_kendall_without_groups_is_nan() -> None:
    trials = [{"trial_id": str(i), "lr": 0.1 * i, "epochs": i, "measure": i, "gap": i} for i in range(5)]
    result = granulated_kendall(trials, "measure", "gap", by=["lr", "epochs"])
    assert math.isnan(result.per_axis["lr"]) and math.isnan(result.per_axis["epochs"])
    assert math.isnan(result.mean)


def test_granulated_kendall_single_axis_and_bad_column() -> None:
    result = granulated_kendall(_grid(), "measure", "gap", by=["lr"])
    # one group (all 6 finite trials), measure vs gap: pairs 15, computed with kendall_tau
    trials = [t for t in _grid() if t["trial_id"] != "nan"]
    assert result.mean == pytest.approx(kendall_tau([t["measure"] for t in trials], [t["gap"] for t in trials]))
    with pytest.raises(ValueError, match="wd"):
        granulated_kendall(_grid(), "measure", "gap", by=["lr", "wd"])


# --------------------------------------------------------------------------- agreement


def test_agreement_sign_convention() -> None:
    same = [
        {"trial_id": "a", "bound": 1.0, "val_acc": 0.9},
        {"trial_id": "b", "bound": 2.0, "val_acc": 0.8},
        {"trial_id": "c", "bound": 3.0, "val_acc": 0.7},
    ]
    assert ranking_agreement(same, "bound", "val_acc") == pytest.approx(1.0)
    opposite = [{**t, "val_acc": 1.6 - float(t["val_acc"])} for t in same]  # type: ignore[arg-type]
    assert ranking_agreement(opposite, "bound", "val_acc") == pytest.approx(-1.0)


def test_agreement_with_oracle_is_ranking_quality() -> None:
    # -bound vs test_acc over t0..t2 ((1,.80),(2,.90),(3,.85)): -bound order t0>t1>t2, test t1>t2>t0
    # pairs: (t0,t1) D, (t0,t2) D, (t1,t2) C -> -1/3
    assert ranking_agreement(_trials(), "bound", "oracle") == pytest.approx(-1 / 3)


# --------------------------------------------------------------------------- leaderboard and summary


def test_leaderboard_orders_and_ranks() -> None:
    board = leaderboard(_trials(), "bound")
    assert board["trial_id"].tolist() == ["t0", "t1", "t2", "t3"]
    assert board["rank"].tolist()[:3] == [1, 2, 3] and pd.isna(board["rank"].iloc[3])
    assert list(board.columns) == [
        "rank",
        "trial_id",
        "bound",
        "measure",
        "val_acc",
        "test_acc",
        "gap",
        "train_acc",
    ]
    assert "val_loss" in leaderboard(_trials(), "val_acc").columns


def test_summary_keys_and_values() -> None:
    result = summary(_trials())
    for measure in ("measure", "bound", "trace", "lambda_max", "distance"):
        for method in ("kendall", "spearman", "pearson"):
            assert f"{method}_{measure}_gap" in result
    assert result["regret_bound"] == pytest.approx(0.15)
    assert result["regret_val_acc"] == pytest.approx(0.10)
    assert result["expected_regret_val_acc"] == pytest.approx(0.075)
    assert result["n_trials"] == 4.0
    # bound vs val_acc on t0..t2: -bound order t0>t1>t2; val_acc t1=t2>t0 -> (0 C - 2 D)/sqrt(3*2)
    assert result["agreement_bound_val_acc"] == pytest.approx(-2 / math.sqrt(6))
    assert all(isinstance(v, float) for v in result.values())


def test_summary_without_val_split_or_gaps() -> None:
    trials = [{"trial_id": str(i), "bound": float(i), "test_acc": 0.5 + 0.1 * i} for i in range(4)]
    result = summary(trials)
    assert math.isnan(result["regret_val_acc"]) and math.isnan(result["expected_regret_val_acc"])
    assert math.isnan(result["kendall_bound_gap"])
    assert result["regret_bound"] == pytest.approx(0.3)


def test_summary_of_empty_sweep() -> None:
    result = summary([])
    assert result["n_trials"] == 0.0 and math.isnan(result["regret_bound"])


# --------------------------------------------------------------------------- recommended selection


def test_recommended_selection_follows_the_noise_case_and_needs_a_validation_split() -> None:
    with_val = [{**t, "n_val": 100.0} for t in _trials()]
    assert selection.recommended_criterion(with_val) == "val_band_bound"  # no F structure reported
    cut = selection.STRUCTURE_CUT
    symmetric = [{**t, "f_structure": cut - 0.05} for t in with_val]
    assert selection.recommended_criterion(symmetric) == "val_acc"
    dependent = [{**t, "f_structure": cut + 0.05} for t in with_val]
    assert selection.recommended_criterion(dependent) == "val_band_bound"
    assert selection.recommended_criterion(_trials()) == "bound"  # size unknown
    no_val = [{**t, "n_val": 0.0, "val_acc": NAN} for t in _trials()]
    assert selection.recommended_criterion(no_val) == "bound"


def test_summary_reports_val_band_bound_regret_when_trials_carry_n_val() -> None:
    """n_val = 100: the band is one binomial s.e. of the best val_acc 0.9, i.e. 0.03, so t1 and t2
    (0.9) are in, t0 (0.8) and t3 (0.7) out; the lowest B in the band is t1 (2.0), test 0.90."""
    stats = summary([{**t, "n_val": 100.0} for t in _trials()])
    assert stats["regret_val_band_bound"] == pytest.approx(0.95 - 0.90)
    assert "regret_val_band_bound" not in summary(_trials())


def test_val_acc_corr_is_selectable_and_regret_is_reported_when_trials_carry_it() -> None:
    trials = [{**t, "val_acc_corr": c} for t, c in zip(_trials(), [0.7, 0.6, 0.9, 0.8], strict=True)]
    assert select(trials, "val_acc_corr") == "t2"
    assert summary(trials)["regret_val_acc_corr"] == pytest.approx(0.95 - 0.85)
    assert "regret_val_acc_corr" not in summary(_trials())
