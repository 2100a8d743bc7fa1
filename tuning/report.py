"""Sweep results read back from MLflow: leaderboard, correlation table, plots (exports: tuning.export)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from trainables import metrics
from trainables.config import RunConfig
from tuning import selection
from tuning.selection import STRUCTURE_CUT
from tuning.sweep import objective_metrics
from tuning.tracking import TRIAL_TAG, child_runs, metric_name, text_from_tags

__all__ = [
    "config_from_params",
    "finished_trials",
    "format_report",
    "noise_case",
    "pareto_table",
    "write_artifacts",
]


def _parse_param(text: str) -> Any:
    if text == "None":
        return None
    return yaml.safe_load(text)


def config_from_params(params: dict[str, str]) -> RunConfig:
    """Rebuild a trial's typed config from its MLflow params (the complete flat config)."""
    flat = {k: _parse_param(v) for k, v in params.items() if isinstance(v, str)}
    scales = flat.get("constraint.group_scales")
    if isinstance(scales, list):
        flat["constraint.group_scales"] = [float(s) for s in scales]
    return RunConfig.from_flat(flat)


def finished_trials(uri: str, exp_id: str, parent_id: str) -> pd.DataFrame:
    """One row per trial that finished its whole budget: ``trial_id``, final metrics, ``params``,
    and ``val_band_bound`` (:func:`tuning.selection.add_selection_metrics`) when trials report
    their validation size."""
    runs = child_runs(uri, exp_id, parent_id)
    if runs.empty:
        return pd.DataFrame(columns=["trial_id"])
    runs = runs[(runs["status"] == "FINISHED") & (runs.get("tags.hesstune.final") == "1")]
    metrics = {c: metric_name(c.removeprefix("metrics.")) for c in runs.columns if c.startswith("metrics.")}
    table = runs[list(metrics)].rename(columns=metrics).reset_index(drop=True)
    table.insert(0, "trial_id", runs[f"tags.{TRIAL_TAG}"].to_numpy())
    table.insert(1, "run_id", runs["run_id"].to_numpy())
    records = runs.to_dict("records")
    for key in ("val_correct", "val_pred"):  # per validation sample: val_band_bound's pairing, val_acc_clean
        table[key] = [text_from_tags(row, key) for row in records]
    param_cols = [c for c in runs.columns if c.startswith("params.")]
    table["params"] = [
        {c.removeprefix("params."): v for c, v in row.items() if isinstance(v, str)}
        for row in runs[param_cols].to_dict("records")
    ]
    if "n_val" in table and not table.empty:  # the sweep-relative metrics of the study's criteria
        table = selection.add_selection_metrics(table)
    return table


CORRELATION_MEASURES = metrics.MEASURES


def pareto_table(table: pd.DataFrame, objective: str) -> pd.DataFrame | None:
    """The Pareto front of a multi-objective sweep (None for a single objective), with the clean
    test accuracy beside it for evaluation."""
    pairs = objective_metrics(objective)
    if len(pairs) < 2:
        return None
    front = selection.pareto_front(table, pairs)  # type: ignore[arg-type]
    extra = [c for c in ("test_acc",) if c in table and c not in front]
    return front.merge(table[["trial_id", *extra]], on="trial_id", how="left")


def format_report(table: pd.DataFrame, criterion: str, *, top: int = 10, objective: str = "") -> str:
    """The leaderboard and the correlation table as text; with a multi-objective ``objective``,
    the search's Pareto front too."""
    board = selection.leaderboard(table, criterion).head(top)
    band = {
        "paired": "the trials' per-sample validation correctness (paired)",
        "unpaired": "val_acc alone (unpaired: these trials did not report per-sample correctness)",
    }
    lines = [
        f"Leaderboard by {criterion} ({len(table)} finished trials; test_acc = clean test, for evaluation)",
        f"  {criterion}: {selection.get_criterion(criterion).description}",
        *(
            [f"  validation band from {band[table.attrs['val_band']]}"]
            if criterion == "val_band_bound" and table.attrs.get("val_band") in band
            else []
        ),
        board.to_string(index=False, float_format=lambda x: f"{x:.4f}"),
        "",
    ]
    front = pareto_table(table, objective) if objective else None
    if front is not None:
        arrows = ", ".join(f"{m} {'↓' if d == 'min' else '↑'}" for m, d in objective_metrics(objective))
        lines += [
            f"Pareto front of the search objectives ({arrows}): {len(front)} of {len(table)} trials "
            f"no other trial beats on both; the pick above is still by {criterion}",
            front.to_string(index=False, float_format=lambda x: f"{x:.4f}"),
            "",
        ]
    measured = {m: int(_finite(table[m]).sum()) for m in CORRELATION_MEASURES if m in table}
    diagnostics = {m: n for m, n in measured.items() if m in metrics.DIAGNOSTICS and n < len(table)}
    measures = [m for m, n in measured.items() if n and not (m in diagnostics and n < 3)]
    if measures and "gap" in table:
        corr = selection.correlations(table, measures=tuple(measures), target="gap")
        lines += [
            "Correlation with the true test gap (noisy-test loss − train loss):",
            corr.to_string(float_format=lambda x: f"{x:.3f}"),
        ]
        if (corr["n"] < 3).any():
            lines.append("(NaN where n < 3: a correlation needs at least 3 finished trials with the measure)")
    if diagnostics:
        counts = ", ".join(f"{m} on {n}" for m, n in diagnostics.items())
        hidden = [m for m, n in diagnostics.items() if n < 3]
        left_out = f"; {', '.join(hidden)} left out of the table: a correlation needs 3 trials" if hidden else ""
        lines.append(
            f"({counts} of {len(table)} trials: a sweep measures them on every N-th trial, "
            f"--diagnostics-every N, 1 for all{left_out})"
        )
    if (measures and "gap" in table) or diagnostics:
        lines.append("")
    regrets = {
        c: selection.regret(table, c)
        for c in ("val_band_bound", "val_acc_clean", "bound", "measure", "val_acc", "val_acc_corr")
        if _has(table, c)
    }
    if regrets:
        lines.append(
            "Selection regret (oracle-best clean test acc − picked trial's): "
            + ", ".join(f"{c} {v:.4f}" for c, v in regrets.items())
        )
    if _has(table, "val_acc") and _has(table, "bound"):
        agreement = selection.ranking_agreement(table, "bound", "val_acc")
        lines.append(f"Ranking agreement, Kendall τ(bound, val_acc): {agreement:.3f}")
    lines += noise_case(table)
    lines += _warnings(table, criterion)
    return "\n".join(lines)


LITTLE_NOISE = 0.05  # f_noise_rate below this: the criteria should agree


def noise_case(table: pd.DataFrame) -> list[str]:
    """Which noise case the sweep's F (median over trials) looks like, and what the selection
    studies found for that case (docs/results.md); nothing when trials did not report F."""
    if "f_noise_rate" not in table or not _finite(table["f_noise_rate"]).any():
        return []
    rate = float(np.nanmedian(pd.to_numeric(table["f_noise_rate"], errors="coerce")))
    structure = (
        float(np.nanmedian(pd.to_numeric(table["f_structure"], errors="coerce")))
        if "f_structure" in table and _finite(table["f_structure"]).any()
        else math.nan
    )
    true_f = _reads_true_f(table)
    where = "the injected F" if true_f else "F estimated from the training labels"
    head = f"Noise case ({where}): about {rate:.0%} of the training labels wrong"
    if not true_f:
        head += " (noise that follows the images is undercounted)"
    if rate < LITTLE_NOISE:
        return [f"{head}: little noise, so the criteria should mostly agree (docs/transition.md)."]
    if not math.isfinite(structure):
        return [f"{head}; with two classes, symmetric and class-dependent noise are the same case."]
    has_val = "n_val" in table and bool((pd.to_numeric(table["n_val"], errors="coerce") > 0).any())
    if structure < STRUCTURE_CUT:
        return [
            f"{head}, spread evenly over the other classes (structure {structure:.2f} < {STRUCTURE_CUT}): "
            "symmetric-like.",
            f"  {SYMMETRIC_ADVICE if has_val else SYMMETRIC_NO_SPLIT_ADVICE}",
        ]
    return [
        f"{head}, concentrated on particular classes (structure {structure:.2f} ≥ {STRUCTURE_CUT}): class-dependent.",
        f"  {CLASS_DEPENDENT_ADVICE if has_val else CLASS_DEPENDENT_NO_SPLIT_ADVICE}",
    ]


SYMMETRIC_ADVICE = (
    "Under symmetric noise, noisy validation accuracy ranks models as clean accuracy does, so the default "
    "selection is val_acc: in both selection studies the Hessian band only added variance there "
    "(docs/results.md)."
)
SYMMETRIC_NO_SPLIT_ADVICE = (
    "Without a validation split the default selection is bound; under symmetric noise, a sweep with a validation "
    "split, selected by val_acc and refit on all the data (hesstune export --refit), did better in both "
    "selection studies (docs/results.md)."
)
CLASS_DEPENDENT_NO_SPLIT_ADVICE = (
    "Without a validation split the default selection is bound, which beat holding out and refitting under "
    "correlated noise in both selection studies and under pair noise on one of the two (docs/results.md)."
)
CLASS_DEPENDENT_ADVICE = (
    "Under class-dependent noise, validation accuracy rewards models that learned the flips, so the default "
    "selection is val_band_bound (the lowest bound B among trials not significantly worse on validation): "
    "it beat val_acc there in both selection studies (docs/results.md)."
)


def _reads_true_f(table: pd.DataFrame) -> bool:
    """Whether the trials used hesstune's injected F (noise injected and revealed) rather than an estimate."""
    if "params" not in table or table.empty or not table["params"].iloc[0]:
        return False
    cfg = config_from_params(table["params"].iloc[0])
    estimated = cfg.consistent.enabled and cfg.consistent.transition == "estimated"
    return cfg.task.noise.kind != "none" and cfg.task.noise.reveal and not estimated


def _warnings(table: pd.DataFrame, criterion: str) -> list[str]:
    """Why a pick on the user's own sweep should not be trusted, when the data say so."""
    out = []
    if "val_acc_corr_fallback" in table and (pd.to_numeric(table["val_acc_corr_fallback"]) > 0).any():
        out.append(
            "warning: the noise matrix F these trials used is ill-conditioned (cond > 10), so val_acc_corr "
            "is plain val_acc here: inverting F would amplify its errors (docs/transition.md)"
        )
    if criterion == "measure":
        out.append(
            "warning: measure alone predicts the generalization gap, not accuracy: its pick may be a trial "
            "that barely trained (compare its train_acc); prefer val_band_bound or bound to pick a model"
        )
    return out


def _finite(column: pd.Series) -> np.ndarray:
    return np.isfinite(pd.to_numeric(column, errors="coerce").to_numpy(float))


def _has(table: pd.DataFrame, criterion: str) -> bool:
    metric = selection.get_criterion(criterion).metric
    return metric in table and bool(_finite(table[metric]).any())


def write_artifacts(table: pd.DataFrame, folder: Path, *, criterion: str, objective: str = "") -> None:
    """Leaderboard CSV, measure-vs-gap scatter, per-layer distance plot and the best configs; for
    a multi-objective ``objective``, the Pareto front as ``pareto_front.csv`` and a plot."""
    from tuning.export import export_configs

    folder.mkdir(parents=True, exist_ok=True)
    selection.leaderboard(table, criterion).to_csv(folder / "leaderboard.csv", index=False)
    table.drop(columns=["params"]).to_csv(folder / "trials.csv", index=False)
    _scatter(table, folder / "measure_vs_gap.png")
    _distances(table, folder / "layer_distances.png")
    front = pareto_table(table, objective) if objective else None
    if front is not None:
        front.to_csv(folder / "pareto_front.csv", index=False)
        _pareto_plot(table, front, objective_metrics(objective), folder / "pareto_front.png")
    export_configs(table, criterion, top=3, folder=folder / "best_configs")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter(table: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    names = [m for m in ("measure", "bound") if m in table and "gap" in table]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        ax.scatter(table[name], table["gap"], c=table.get("test_acc"), cmap="viridis")
        tau = selection.kendall_tau(table[name].to_numpy(float), table["gap"].to_numpy(float))
        ax.set(xlabel=name, ylabel="true test gap", title=f"{name} vs gap (Kendall τ {tau:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pareto_plot(table: pd.DataFrame, front: pd.DataFrame, pairs: list[tuple[str, str]], path: Path) -> None:
    """The first two objectives: every trial, the front's trials marked and joined."""
    plt = _plt()
    (x, _), (y, _) = pairs[:2]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(table[x], table[y], c="0.6", label="trials")
    ordered = front.sort_values(x)
    ax.plot(ordered[x], ordered[y], "o-", c="C3", label="Pareto front")
    ax.set(xlabel=x, ylabel=y, title=f"search objectives: {len(front)} of {len(table)} trials on the front")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _distances(table: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    cols = sorted(c for c in table if c.startswith("dist/"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for _, row in table.iterrows():
        ax.plot(range(len(cols)), row[cols].to_numpy(float), alpha=0.4, marker="o")
    ax.set_xticks(range(len(cols)), [c.removeprefix("dist/") for c in cols])
    ax.set(xlabel="depth group", ylabel="‖W − W0‖_F", title="fine-tuned distance per layer group, one line per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
