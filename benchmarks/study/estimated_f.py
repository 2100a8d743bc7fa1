"""What a study with an *estimated* noise matrix adds (``task.noise.reveal=false``: Fashion-MNIST).

Every criterion of such a study reads only the estimate: the runner computed B, its C,
``noise_entropy``, ``noise_acc``, ``val_acc_corr`` and the validation scores from it, and keeps
the same columns computed with the true F under the prefix ``trueF_`` for evaluation. This module
turns that into:

- the product's guard (:func:`guarded`): ``val_acc_corr`` and the F-corrected validation scores
  fall back to plain noisy validation accuracy where F is ill-conditioned, as trials do;
- regret per criterion over *regimes* (noise setting × size): the mean and the **worst** regime
  (Dziugaite et al. 2020: averages hide the failures);
- the estimation error ``f_error`` per regime, and what each F-reading criterion loses from the
  estimate (its regret with the estimate minus its regret with the true F on the same searches);
- M's Kendall τ with the gap once both are regressed on the swept hyperparameters (Andriushchenko
  et al. 2023: sharpness may only track the hyperparameters);
- the issue's ``fashion_*`` KEY lines (regret in points of clean test accuracy);
- the side-by-side of this study's conclusions with the digits study's (:func:`side_by_side`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainables.noise import CORRECTION_MAX_COND
from tuning.selection import kendall_tau

from .criteria import bound_floor, guard_excess

__all__ = [
    "TRUE_F_PREFIX",
    "estimation_cost",
    "f_error_table",
    "guarded",
    "is_estimated",
    "key_lines",
    "markdown",
    "regime_summary",
    "residual_tau",
    "side_by_side",
    "true_f_frame",
    "with_noise_case",
    "with_noise_case_of_runs_f",
]

TRUE_F_PREFIX = "trueF_"
DEFAULT = "noise_case_switch"  # the product's default selection with a validation split (recommended_criterion)
BAND = "val_band_bound"  # the default before both studies were in: its lines stay for comparison
NOSPLIT_DEFAULT = "bound"  # … and without one
SEARCH = ["setting", "size", "seed", "arm"]


def is_estimated(frame: pd.DataFrame) -> bool:
    """Whether the study's runs used an estimated F (their rows say which F they used)."""
    return "transition" in frame and frame["transition"].astype(str).str.startswith("estimated").any()


def guarded(frame: pd.DataFrame, cond_column: str = "F_cond") -> pd.DataFrame:
    """The product's guard: where F's condition number exceeds CORRECTION_MAX_COND, val_acc_corr
    is plain val_acc and the per-sample corrected scores are plain correctness."""
    out = frame.copy()
    if cond_column not in out:
        return out
    unstable = pd.to_numeric(out[cond_column], errors="coerce").to_numpy(float) > CORRECTION_MAX_COND
    out["val_acc_corr_fallback"] = unstable.astype(float)
    out.loc[unstable, "val_acc_corr"] = out.loc[unstable, "val_acc"]
    if "val_labels_pred" in out:
        out["val_scores"] = [
            (pair[0] == pair[1]).astype(float) if bad and pair is not None else scores
            for bad, pair, scores in zip(unstable, out["val_labels_pred"], out["val_scores"], strict=True)
        ]
    return out


def true_f_frame(frame: pd.DataFrame, labels_path: Path) -> pd.DataFrame:
    """The same candidates with every F-reading column computed from the true F (evaluation only)."""
    out = frame.copy()
    for col in [c for c in frame.columns if c.startswith(TRUE_F_PREFIX)]:
        out[col.removeprefix(TRUE_F_PREFIX)] = frame[col]
    if labels_path.is_file() and "val_labels_pred" in out:
        labels = json.loads(labels_path.read_text())
        scores = []
        for search, pair in zip(out["search"], out["val_labels_pred"], strict=True):
            true_f = labels.get(search, {}).get("true_F")
            if pair is None or true_f is None:
                scores.append(None)
                continue
            scores.append(np.linalg.inv(np.asarray(true_f))[pair[0], pair[1]])
        out["val_scores"] = scores
    out["bound_floor"] = bound_floor(out)
    out["guard_excess"] = guard_excess(out)
    return guarded(out, cond_column=f"{TRUE_F_PREFIX}F_cond")


def with_noise_case(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``f_structure`` of each tv search's estimated F, from ``benchmarks/transition_estimators.py
    --csv`` on the same draws (setting, training size, split seed); NaN for the pool arm, whose
    training set (train ∪ val) is another draw, and everywhere when the file is missing."""
    frame = frame.drop(columns="f_structure", errors="ignore")
    if not path.is_file():
        return frame.assign(f_structure=math.nan)
    draws = pd.read_csv(path)
    draws = draws.assign(size="f" + draws["train_size"].astype(str), arm="tv")[
        ["setting", "size", "seed", "arm", "f_structure"]
    ]
    return frame.merge(draws, on=["setting", "size", "seed", "arm"], how="left")


def with_noise_case_of_runs_f(frame: pd.DataFrame, labels_path: Path) -> pd.DataFrame:
    """``f_structure`` of the F each tv search's runs used (``val_labels.json``: the revealed F of a
    study that is not estimating it), NaN where there is none (clean labels) or no file."""
    from trainables.noise import noise_structure

    frame = frame.drop(columns="f_structure", errors="ignore")
    runs_f = json.loads(labels_path.read_text()) if labels_path.is_file() else {}
    structure = {key: noise_structure(np.asarray(entry["F"])) for key, entry in runs_f.items() if entry.get("F")}
    return frame.assign(f_structure=frame["search"].map(structure).astype(float))


def regime_summary(summary: pd.DataFrame, arm: str = "tv") -> pd.DataFrame:
    """Per criterion: the mean over regimes (setting × size) of the seed-mean regret, the worst
    regime's seed-mean regret and which regime it is (points of clean test accuracy)."""
    s = summary[(summary["arm"] == arm) & summary["mean"].notna()]
    rows = []
    for criterion, group in s.groupby("criterion", sort=False):
        worst = group.loc[group["mean"].idxmax()]
        rows.append(
            {
                "criterion": criterion,
                "mean": 100 * float(group["mean"].mean()),
                "worst": 100 * float(worst["mean"]),
                "worst_regime": f"{worst['setting']} {worst['size']}",
                "regimes": len(group),
            }
        )
    return pd.DataFrame(rows).sort_values("worst").reset_index(drop=True)


def f_error_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean (over seeds and arms) and worst ‖F̂ − F‖_max per regime, one value per search."""
    per_search = frame.groupby(SEARCH, sort=False)["f_error"].first().reset_index()
    return (
        per_search.groupby(["setting", "size"], sort=False)["f_error"]
        .agg(["mean", "max", "count"])
        .reset_index()
        .rename(columns={"count": "searches"})
    )


def estimation_cost(table: pd.DataFrame, table_true: pd.DataFrame, arm: str = "tv") -> pd.DataFrame:
    """Per criterion whose picks depend on F: mean regret with the estimate, with the true F, and
    the difference (points; positive: estimating F cost that much), per noise kind and overall."""
    keys = [*SEARCH, "criterion"]
    est = table[table["arm"] == arm].set_index(keys)["regret"]
    true = table_true[table_true["arm"] == arm].set_index(keys)["regret"]
    both = pd.DataFrame({"estimated": est, "true": true}).dropna().reset_index()
    both["kind"] = both["setting"].str.rstrip("0123456789")
    changed = both.groupby("criterion").apply(lambda g: bool((g["estimated"] - g["true"]).abs().gt(1e-12).any()))
    both = both[both["criterion"].isin(changed[changed].index)]
    rows = [_cost_row(criterion, kind, g) for (criterion, kind), g in both.groupby(["criterion", "kind"])]
    for criterion, g in both.groupby("criterion"):
        rows.append(_cost_row(criterion, "all", g))
    return pd.DataFrame(rows)


def _cost_row(criterion: str, kind: str, g: pd.DataFrame) -> dict[str, Any]:
    return {
        "criterion": criterion,
        "kind": kind,
        "estimated": 100 * float(g["estimated"].mean()),
        "true": 100 * float(g["true"].mean()),
        "cost": 100 * float((g["estimated"] - g["true"]).mean()),
        "searches": len(g),
    }


HYPERPARAMETERS = ("lr", "constraint_radius", "constraint_growth", "nso_sigma", "self_label", "epochs")


def residual_tau(group: pd.DataFrame, measure: str = "measure", target: str = "gap") -> float:
    """Kendall τ between M and the gap once both are regressed on the swept hyperparameters (log lr,
    each method's on/off and log strength, self-labeling, epochs): whether M says anything about
    the gap that the hyperparameters do not already say."""
    x = _hyperparameter_design(group)
    y = group[[measure, target]].to_numpy(float)
    ok = np.isfinite(y).all(axis=1)
    if ok.sum() <= x.shape[1] + 2:
        return math.nan
    coef, *_ = np.linalg.lstsq(x[ok], y[ok], rcond=None)
    residual = np.full(y.shape, np.nan)
    residual[ok] = y[ok] - x[ok] @ coef
    return kendall_tau(pd.Series(residual[:, 0]), pd.Series(residual[:, 1]))


def _hyperparameter_design(group: pd.DataFrame) -> np.ndarray:
    cols = [np.ones(len(group))]
    for name in HYPERPARAMETERS:
        values = pd.to_numeric(group[name], errors="coerce").to_numpy(float)
        present = np.isfinite(values)
        if name in ("lr", "constraint_radius", "nso_sigma"):
            values = np.log(np.where(present & (values > 0), values, 1.0))
        if name not in ("lr", "epochs", "self_label"):
            cols.append(present.astype(float))  # the method is on
        cols.append(np.where(present, values, 0.0))
    return np.column_stack(cols)


def key_lines(
    corr: pd.DataFrame, summary: pd.DataFrame, table: pd.DataFrame, nv: pd.DataFrame, frame: pd.DataFrame
) -> list[str]:
    """The ``fashion_*`` KEY lines: means over seeds (and sizes, where a line has no size), regret
    in points of clean test accuracy, F error as ‖F̂ − F‖_max."""
    out: dict[str, float | str] = {}
    tv40 = corr[(corr["arm"] == "tv") & corr["setting"].str.endswith("40")]
    out["fashion_kendall_tau_measure_gap_noise40"] = float(tv40["tau/measure/gap"].mean())
    t = table[(table["arm"] == "tv") & table["regret"].notna()]
    for kind in ("symmetric", "pair", "correlated"):
        s = t[t["setting"] == f"{kind}40"]
        out[f"fashion_regret_default_noise40_{kind}"] = 100 * float(s[s["criterion"] == DEFAULT]["regret"].mean())
        out[f"fashion_regret_val_noisy_noise40_{kind}"] = 100 * float(s[s["criterion"] == "val_acc"]["regret"].mean())
    regimes = regime_summary(summary).set_index("criterion")
    if {DEFAULT, "val_acc"} <= set(regimes.index):
        out["fashion_worst_regret_default_minus_val"] = float(
            regimes.loc[DEFAULT, "worst"] - regimes.loc["val_acc", "worst"]
        )
        mean_delta = regimes.loc[DEFAULT, "mean"] - regimes.loc["val_acc", "mean"]
        out["fashion_mean_regret_default_minus_val"] = float(mean_delta)
    if {BAND, "val_acc"} <= set(regimes.index):
        out["fashion_worst_regret_val_band_bound_minus_val"] = float(
            regimes.loc[BAND, "worst"] - regimes.loc["val_acc", "worst"]
        )
        out["fashion_mean_regret_val_band_bound_minus_val"] = float(
            regimes.loc[BAND, "mean"] - regimes.loc["val_acc", "mean"]
        )
    pool = table[(table["arm"] == "pool") & table["regret"].notna()]
    for kind in ("symmetric", "pair", "correlated"):
        p = pool[(pool["setting"] == f"{kind}40") & (pool["criterion"] == NOSPLIT_DEFAULT)]
        if not p.empty:
            out[f"fashion_regret_nosplit_hessian_noise40_{kind}"] = 100 * float(p["regret"].mean())
        if not nv.empty:
            n = nv[nv["setting"] == f"{kind}40"]
            hess = n[n["procedure"] == f"(a) {NOSPLIT_DEFAULT} on pool"]["acc"]
            refit = n[n["procedure"] == "(c) val_acc → retrain on pool"]["acc"]
            if len(hess) and len(refit):
                out[f"fashion_nosplit_hessian_minus_refit_noise40_{kind}"] = 100 * float(hess.mean() - refit.mean())
    searches = frame.groupby(SEARCH)["f_error"].first().reset_index()
    out["fashion_f_error_noise40"] = float(searches[searches["setting"].str.endswith("40")]["f_error"].mean())
    return [f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in out.items()]


def markdown(
    summary: pd.DataFrame, cost: pd.DataFrame, f_errors: pd.DataFrame, residual: pd.DataFrame, criteria: list[str]
) -> str:
    """The estimated-F sections of tables.md."""
    reg = regime_summary(summary)
    reg = reg[reg["criterion"].isin(criteria)]
    lines = [
        "## Mean and worst regime (tv arm; points of clean test accuracy)",
        "",
        "Each regime is one noise setting × training size; its value is the mean regret over seeds.",
        "",
        "| criterion | mean over regimes | worst regime | which | regimes |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.criterion} | {r.mean:.1f} | {r.worst:.1f} | {r.worst_regime} | {r.regimes} |" for r in reg.itertuples()
    ]
    lines += [
        "",
        "## Estimation error of F (‖F̂ − F‖_max, one value per search)",
        "",
        "| setting | size | mean | worst | searches |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.setting} | {r.size} | {r.mean:.3f} | {r.max:.3f} | {r.searches} |" for r in f_errors.itertuples()]
    lines += [
        "",
        "## What estimating F cost each criterion that reads it (tv arm; points)",
        "",
        "Regret with the estimate minus regret with the true F, on the same candidates.",
        "",
        "| criterion | noise | regret, estimated F | regret, true F | cost | searches |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.criterion} | {r.kind} | {r.estimated:.1f} | {r.true:.1f} | {r.cost:+.1f} | {r.searches} |"
        for r in cost.itertuples()
    ]
    lines += [
        "",
        "## M against the gap once the hyperparameters are regressed out of both (tv arm)",
        "",
        "| setting | size | τ(M, gap) | τ(residual M, residual gap) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.setting} | {r.size} | {r.tau:.2f} | {r.residual_tau:.2f} |" for r in residual.itertuples()]
    return "\n".join(lines)


def _study_numbers(corr: pd.DataFrame, table: pd.DataFrame, nv: pd.DataFrame) -> dict[str, float]:
    """The numbers the side-by-side compares, per noise kind at 40 % (sizes pooled; points)."""
    out: dict[str, float] = {}
    t = table[(table["arm"] == "tv") & table["regret"].notna()]
    tv = corr[corr["arm"] == "tv"]
    for kind in ("symmetric", "pair", "correlated"):
        setting = f"{kind}40"
        out[f"tau {kind}"] = float(tv[tv["setting"] == setting]["tau/measure/gap"].mean())
        s = t[t["setting"] == setting]
        regret = {c: 100 * float(s[s["criterion"] == c]["regret"].mean()) for c in ("val_acc", DEFAULT)}
        out[f"val {kind}"], out[f"default {kind}"] = regret["val_acc"], regret[DEFAULT]
        out[f"delta {kind}"] = regret[DEFAULT] - regret["val_acc"]
        n = nv[nv["setting"] == setting] if not nv.empty else nv
        if not n.empty:
            hess = n[n["procedure"] == f"(a) {NOSPLIT_DEFAULT} on pool"]["acc"]
            refit = n[n["procedure"] == "(c) val_acc → retrain on pool"]["acc"]
            out[f"nosplit {kind}"] = 100 * float(hess.mean() - refit.mean())
    regimes = regime_summary(summarise_regret(t)).set_index("criterion")
    for c, name in ((DEFAULT, "default"), ("val_acc", "val")):
        out[f"{name} mean"], out[f"{name} worst"] = regimes.loc[c, "mean"], regimes.loc[c, "worst"]
    out["delta worst"] = out["default worst"] - out["val worst"]
    out["delta mean"] = out["default mean"] - out["val mean"]
    return out


def summarise_regret(table: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean regret per (setting, size, arm, criterion), the shape :func:`regime_summary` reads."""
    return (
        table.groupby(["setting", "size", "arm", "criterion"], sort=False)["regret"].mean().rename("mean").reset_index()
    )


SIDE_ROWS = [
    ("tau {k}", "τ(M, gap), {k} 40 %", "{:.2f}", "both ≥ 0.5"),
    ("delta {k}", "default − val_acc regret, {k} 40 % (points)", "{:+.1f}", "same sign"),
    ("nosplit {k}", "no split: B on all − refit, {k} 40 % (points)", "{:+.1f}", "same sign"),
]


def side_by_side(
    this: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    other: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    names: tuple[str, str] = ("digits", "Fashion-MNIST"),
) -> str:
    """Markdown: the other (digits) study's conclusions next to this one's, and whether each
    transfers (τ ≥ 0.5 in both; a regret difference of the same sign in both)."""
    a, b = _study_numbers(*other), _study_numbers(*this)
    lines = [f"| quantity | {names[0]} | {names[1]} | transfers? |", "|---|---|---|---|"]

    def row(key: str, label: str, fmt: str, rule: str) -> None:
        if key not in a or key not in b or not (math.isfinite(a[key]) and math.isfinite(b[key])):
            return
        same = (a[key] >= 0.5 and b[key] >= 0.5) if rule == "both ≥ 0.5" else (np.sign(a[key]) == np.sign(b[key]))
        lines.append(f"| {label} | {fmt.format(a[key])} | {fmt.format(b[key])} | {'yes' if same else 'no'} |")

    for key, label, fmt, rule in SIDE_ROWS:
        for kind in ("symmetric", "pair", "correlated"):
            row(key.format(k=kind), label.format(k=kind), fmt, rule)
    row("delta mean", "default − val_acc, mean over regimes (points)", "{:+.1f}", "same sign")
    row("delta worst", "default − val_acc, worst regime (points)", "{:+.1f}", "same sign")
    return "\n".join(lines)
