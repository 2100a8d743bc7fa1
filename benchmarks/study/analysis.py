"""Analysis of the selection study: correlations, regret with confidence intervals, the
no-validation comparison, figures, tables and the ``KEY: VALUE`` summary.

Every number is a pure function of ``trials.csv`` (one row per candidate), so a test can
re-derive any published cell. Conventions:

- a *search* is (setting, size, seed, arm); statistics are computed per search, then summarised
  over seeds as mean, sd and a 95 % t-interval (n = number of seeds, so 3 seeds → t = 4.30);
- regret = best clean test accuracy among the search's candidates − the delivered one (mean
  over exact ties, i.e. random tie-breaking);
- a criterion with a constant gets it from the *other* seeds of the *other* settings of the same
  arm (leave-one-seed-and-setting-out): the constant is never chosen on the data it is scored on;
- "the best Hessian criterion" is itself chosen that way (lowest mean regret on the other seeds
  and settings), so its reported regret is not a best-of-many maximum.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from tuning.selection import granulated_kendall, kendall_tau, partial_kendall, spearman_rho

from . import estimated_f as ef
from .criteria import (
    CRITERIA,
    REFERENCES,
    STRUCTURE_ALPHA,
    TUNED,
    bound_floor,
    delivered,
    guard_excess,
    pick,
    structure_p_value,
)
from .runner import enrich_from_raw, labels_from_text, load_rows

__all__ = ["analyze", "correlation_table", "key_lines", "load_trials", "selection_table", "write_trials"]

SEARCH = ["setting", "size", "seed", "arm"]
# columns kept in trials.csv (the committed results), in this order
COLUMNS = [
    "trial_id",
    "search",
    "setting",
    "kind",
    "rate",
    "size",
    "seed",
    "arm",
    "run",
    "epochs",
    "method",
    "lr",
    "constraint_radius",
    "constraint_growth",
    "nso_sigma",
    "self_label",
    "n_train",
    "n_val",
    "num_classes",
    "realised_noise",
    "noise_entropy",
    "noise_acc",
    "F_min",
    "train_loss",
    "train_acc",
    "train_acc_clean",
    "memorized",
    "val_acc",
    "val_loss",
    "test_acc",
    "test_loss",
    "test_loss_noisy",
    "test_acc_noisy",
    "gap",
    "gap_clean",
    "distance",
    "measure",
    "measure_mean",
    "measure_p90",
    "measure_p99",
    "measure_noisy",
    "measure_cleanlab",
    "frac_max_noisy",
    "curv_ratio_noisy",
    "bound",
    "bound_loss",
    "bound_C",
    "bound_fwd",
    "test_bound_loss_noisy",
    "test_bound_loss_clean",
    "val_bound_loss",
    "train_trunc",
    "train_cons",
    "test_trunc_clean",
    "val_acc_corr",
    "val_correct",
    "val_pred",
    "train_s",
    "measure_s",
    "run_cpu_s",
]
# columns of studies where F was estimated (task.noise.reveal=false): which F the runs used, its
# error, and the F-reading columns recomputed with the true F (evaluation only, prefix trueF_)
ESTIMATED_F_COLUMNS = [
    "transition",
    "f_error",
    "F_cond",
    *(
        f"trueF_{c}"
        for c in (
            "noise_entropy",
            "noise_acc",
            "F_min",
            "F_cond",
            "bound",
            "bound_loss",
            "bound_C",
            "bound_fwd",
            "test_bound_loss_noisy",
            "test_bound_loss_clean",
            "val_bound_loss",
            "train_cons",
            "val_acc_corr",
        )
    ),
]
MEASURES = ["measure", "bound", "bound_floor", "measure_mean", "measure_p99", "distance", "train_loss", "val_loss"]
TARGETS = {"gap": "gap", "test_loss": "test_loss"}


# --------------------------------------------------------------------------- data


def write_trials(out: Path, stores: list[Path], raw_dirs: list[Path] = ()) -> pd.DataFrame:  # type: ignore[assignment]
    """runs.jsonl stores → ``out/trials.csv`` (compact: 6 significant digits), returns the frame.
    With ``raw_dirs``, columns added after a run was recorded are filled from its raw outputs.
    The noisy validation labels and F per search go to ``val_labels.json`` (from the raw outputs,
    or from the rows' own ``val_labels`` records)."""
    rows = [row for store in stores for row in load_rows(store)]
    labels: dict[str, Any] = {}
    for raw_dir in raw_dirs:
        labels.update(enrich_from_raw(rows, raw_dir))
    for row in rows:
        entry = row.pop("val_labels", None)
        if entry is not None:
            labels.setdefault(row["search"], entry)
    out.mkdir(parents=True, exist_ok=True)
    if labels:
        (out / "val_labels.json").write_text(json.dumps(dict(sorted(labels.items()))))
    frame = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in frame.columns:
            frame[col] = np.nan
    kept = COLUMNS + ([c for c in ESTIMATED_F_COLUMNS if c in frame.columns] if "transition" in frame else [])
    frame = frame[kept].sort_values(["setting", "size", "seed", "arm", "run", "epochs"]).reset_index(drop=True)
    frame.to_csv(out / "trials.csv", index=False, float_format="%.6g")
    return load_trials(out / "trials.csv")


def load_trials(path: Path) -> pd.DataFrame:
    """trials.csv plus derived columns; with ``val_labels.json`` beside it, also the per-sample
    corrected validation scores (F⁻¹)[ỹ_j, h(x_j)] as an in-memory column ``val_scores``."""
    frame = pd.read_csv(path, dtype={"val_correct": str, "val_pred": str})
    frame["bound_floor"] = bound_floor(frame)
    frame["guard_excess"] = guard_excess(frame)
    labels_path = path.parent / "val_labels.json"
    if labels_path.is_file() and "val_pred" in frame:
        labels = json.loads(labels_path.read_text())
        scores: list[Any] = []
        pairs: list[Any] = []
        for search, pred in zip(frame["search"], frame["val_pred"], strict=True):
            entry = labels.get(search)
            if entry is None or not isinstance(pred, str):
                scores.append(None)
                pairs.append(None)
                continue
            noisy, h = labels_from_text(entry["val_noisy"]), labels_from_text(pred)
            k = int(max(noisy.max(), h.max())) + 1
            inv = np.eye(k) if entry["F"] is None else _inverse(np.asarray(entry["F"]))
            scores.append(inv[noisy, h])
            pairs.append((noisy, h))
        frame["val_scores"] = scores
        frame["val_labels_pred"] = pairs  # (noisy val labels, predictions): criteria that estimate F
    return frame


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """F⁻¹; an estimated F can be singular: plain correctness (I) then, as the product's guard gives."""
    try:
        return np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        return np.eye(len(matrix))


def complete_searches(frame: pd.DataFrame) -> pd.DataFrame:
    """Only searches whose runs all finished (same run count as the largest search of the preset)."""
    counts = frame.groupby(SEARCH)["run"].nunique()
    full = counts[counts == counts.max()].index
    keep = frame.set_index(SEARCH).index.isin(full)
    return frame[keep].reset_index(drop=True)


def _searches(frame: pd.DataFrame) -> list[tuple[tuple[Any, ...], pd.DataFrame]]:
    return [(key, group.reset_index(drop=True)) for key, group in frame.groupby(SEARCH, sort=True)]


def _nanmean(values: Any) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _nanmedian(values: Any) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def _ci(values: Any) -> tuple[float, float, float, int]:
    """(mean, sd, half-width of the 95 % t-interval, n) over finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan, 0
    if v.size == 1:
        return float(v[0]), math.nan, math.nan, 1
    sd = float(v.std(ddof=1))
    return float(v.mean()), sd, float(sps.t.ppf(0.975, v.size - 1) * sd / math.sqrt(v.size)), int(v.size)


# --------------------------------------------------------------------------- correlations


def search_correlations(group: pd.DataFrame) -> dict[str, float]:
    """Per search: τ, ρ of each measure vs gap and clean test loss; partial τ given train loss;
    granulated τ (axes: run = the other hyperparameters, epochs); how often B bounds the loss."""
    out: dict[str, float] = {}
    train_loss = group["train_loss"]
    for m in MEASURES:
        if group[m].isna().all():
            continue
        for tname, t in TARGETS.items():
            out[f"tau/{m}/{tname}"] = kendall_tau(group[m], group[t])
            out[f"rho/{m}/{tname}"] = spearman_rho(group[m], group[t])
            out[f"ptau/{m}/{tname}"] = partial_kendall(group[m], group[t], train_loss)
        gran = granulated_kendall(group.assign(trial_id=group["trial_id"].astype(str)), m, "gap", by=["run", "epochs"])
        out[f"psi_run/{m}/gap"] = gran.per_axis["run"]
        out[f"psi_epochs/{m}/gap"] = gran.per_axis["epochs"]
        out[f"psi/{m}/gap"] = gran.mean
    out["bound_holds"] = float((group["bound"] >= group["test_bound_loss_noisy"]).mean())
    out["bound_holds_clean"] = float((group["bound"] >= group["test_bound_loss_clean"]).mean())
    out["memorized_median"] = float(group["memorized"].median())
    out["gap_slope"] = gap_slope(group)
    fgap = group["test_bound_loss_noisy"] - group["bound_loss"]
    out["pearson_gapB_measure"] = float(np.corrcoef(fgap, group["measure"])[0, 1])
    # why a bound ranks badly: its slack (B − what it bounds) varies between candidates, and
    # against the target's own spread; τ(slack, target) < 0 means the slack shrinks exactly
    # where the target grows (memorisers)
    target = group["test_bound_loss_noisy"]
    slack = group["bound"] - target
    out["slack_sd_ratio"] = float(slack.std() / target.std()) if target.std() > 0 else math.nan
    out["tau_slack_target"] = kendall_tau(slack, target)
    out["tau_bound_target"] = kendall_tau(group["bound"], target)
    out["tau_val_target"] = (
        kendall_tau(group["val_bound_loss"], target) if group["val_bound_loss"].notna().any() else math.nan
    )
    return out


def correlation_table(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, group in _searches(frame):
        rows.append({**dict(zip(SEARCH, key, strict=True)), **search_correlations(group)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- selection


def _choose_constant(
    name: str, scores: dict[tuple[Any, ...], dict[float, float]], key: tuple[Any, ...]
) -> tuple[float, str]:
    """The grid value with the best mean accuracy on searches of other seeds *and* other settings
    (same arm); only other seeds if no other setting exists yet. Ties → median tied value."""
    pool, source = _held_out(list(scores), key)
    grid = TUNED[name]
    means = np.array([_nanmean([scores[k][c] for k in pool]) if pool else math.nan for c in grid])
    if not np.isfinite(means).any():
        return grid[len(grid) // 2], "default"
    best = np.flatnonzero(means >= np.nanmax(means) - 1e-12)
    return float(grid[best[len(best) // 2]]), source


def gap_slope(group: pd.DataFrame) -> float:
    """κ: least-squares slope through the origin of B's loss gap (noisy test − train) on M."""
    gap = group["test_bound_loss_noisy"].to_numpy(float) - group["bound_loss"].to_numpy(float)
    m = group["measure"].to_numpy(float)
    ok = np.isfinite(gap) & np.isfinite(m)
    return float((gap[ok] * m[ok]).sum() / (m[ok] ** 2).sum()) if ok.any() and (m[ok] ** 2).sum() > 0 else math.nan


def _held_out(keys: list[tuple[Any, ...]], key: tuple[Any, ...]) -> tuple[list[tuple[Any, ...]], str]:
    setting, _size, seed, arm = key
    pool = [k for k in keys if k[2] != seed and k[0] != setting and k[3] == arm]
    if pool:
        return pool, "other seeds+settings"
    return [k for k in keys if k[2] != seed and k[3] == arm], "other seeds (same setting)"


def selection_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (search, criterion) with delivered test accuracy and regret."""
    searches = _searches(frame)
    tuned_scores: dict[str, dict[tuple[Any, ...], dict[float, float]]] = {name: {} for name in TUNED}
    slopes = {key: gap_slope(group) for key, group in searches}
    for key, group in searches:
        for name, grid in TUNED.items():
            tuned_scores[name][key] = {c: delivered(group, pick(name, group, c)) for c in grid}
    rows = []
    for key, group in searches:
        oracle = float(group["test_acc"].max())
        base = {**dict(zip(SEARCH, key, strict=True)), "oracle": oracle, "mean_acc": float(group["test_acc"].mean())}
        for name, (spec, _) in {**CRITERIA, **REFERENCES}.items():
            constant, source = (None, "")
            if name in TUNED:
                constant, source = _choose_constant(name, tuned_scores[name], key)
            elif name == "bound_calibrated":
                keys, source = _held_out(list(slopes), key)
                constant = float(_nanmedian([slopes[k] for k in keys])) if keys else None
            picks = pick(name, group, constant)
            acc = delivered(group, picks)
            rows.append(
                {
                    **base,
                    "criterion": name,
                    "hessian": spec.hessian,
                    "reference": name in REFERENCES,
                    "needs_val": spec.needs_val,
                    "acc": acc,
                    "regret": oracle - acc,
                    "memorized": delivered(group, picks, "memorized"),
                    "n_picks": len(picks),
                    "constant": constant,
                    "constant_from": source,
                }
            )
        rows.append(
            {
                **base,
                "criterion": "random",
                "hessian": False,
                "needs_val": False,
                "acc": base["mean_acc"],
                "regret": oracle - base["mean_acc"],
                "n_picks": len(group),
            }
        )
    table = pd.DataFrame(rows)
    return pd.concat([table, _best_hessian_rows(table)], ignore_index=True)


def _best_hessian_rows(table: pd.DataFrame) -> pd.DataFrame:
    """'hessian_best' (any criterion using M) and 'hessian_best_labelfree' (no held-out split):
    the criterion is chosen on other seeds and settings of the same arm (lowest mean regret)."""
    rows = []
    for label, pool_filter in (
        ("hessian_best", lambda t: t["hessian"]),
        ("hessian_best_labelfree", lambda t: t["hessian"] & ~t["needs_val"]),
    ):
        cands = table[pool_filter(table) & table["regret"].notna()]
        for key, group in cands.groupby(SEARCH):
            setting, _size, seed, arm = key
            other = cands[(cands["seed"] != seed) & (cands["setting"] != setting) & (cands["arm"] == arm)]
            source = "other seeds+settings"
            if other.empty:
                other = cands[(cands["seed"] != seed) & (cands["arm"] == arm)]
                source = "other seeds (same setting)"
            if other.empty:
                continue
            chosen = other.groupby("criterion")["regret"].mean().idxmin()
            row = group[group["criterion"] == chosen].iloc[0].to_dict()
            row.update({"criterion": label, "chosen": chosen, "constant_from": source})
            rows.append(row)
    return pd.DataFrame(rows)


KEY_CRITERIA = [
    "val_acc",
    "val_band_bound",
    "bound",
    "bound_trunc",
    "bound_floor",
    "measure_at_fit",
    "measure",
    "guard_train_loss",
    "ideal_bound",
    "ideal_noisy_acc",
    "random",
]
SETTING_ORDER = [
    "clean",
    "symmetric20",
    "symmetric40",
    "symmetric60",
    "pair20",
    "pair40",
    "pair60",
    "correlated20",
    "correlated40",
    "correlated60",
]


def _residual_taus(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, size), tv arm: mean over seeds of τ(M, gap) and of τ(M's residual on the
    hyperparameters, gap)."""
    rows = []
    for key, group in _searches(frame):
        if key[3] != "tv":
            continue
        rows.append(
            {
                "setting": key[0],
                "size": key[1],
                "tau": kendall_tau(group["measure"], group["gap"]),
                "residual_tau": ef.residual_tau(group),
            }
        )
    out = pd.DataFrame(rows)
    return out.groupby(["setting", "size"], sort=False)[["tau", "residual_tau"]].mean().reset_index() if rows else out


def _setting_rank(setting: str) -> int:
    return SETTING_ORDER.index(setting) if setting in SETTING_ORDER else len(SETTING_ORDER)


def _setting_keys(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(setting, size) in table order: settings as designed, ``full`` first, then sizes by their
    number (f500 before f2000). A total order: the keys come from a set, whose order varies."""
    keys = set(zip(frame["setting"], frame["size"], strict=True))
    return sorted(keys, key=lambda k: (_setting_rank(k[0]), k[1] != "full", _size_number(k[1]), k[1]))


def _size_number(size: str) -> int:
    digits = "".join(ch for ch in size if ch.isdigit())
    return int(digits) if digits else 0


def key_regret_markdown(summary: pd.DataFrame, arm: str = "tv", criteria: list[str] = KEY_CRITERIA) -> str:
    """Rows (setting, size), columns the key criteria: mean regret ± 95 % CI half-width (points).
    The published table of docs/results.md; a test re-derives cells of it from trials.csv."""
    s = summary[summary["arm"] == arm]
    crits = [c for c in criteria if c in set(s["criterion"])]
    lines = ["| setting | size | " + " | ".join(crits) + " |", "|---|---" + "|---" * len(crits) + "|"]
    for setting, size in _setting_keys(s):
        cells = []
        for c in crits:
            r = s[(s["criterion"] == c) & (s["setting"] == setting) & (s["size"] == size)]
            cells.append(_fmt(float(r["mean"].iloc[0]), float(r["ci"].iloc[0])) if len(r) else "–")
        lines.append(f"| {setting} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correlation_summary_markdown(corr: pd.DataFrame, frame: pd.DataFrame, arm: str = "tv") -> str:
    """One row per (setting, size): means over seeds of the measure-vs-gap statistics."""
    c = corr[corr["arm"] == arm]
    head = (
        "| setting | size | τ(M, gap) | ρ(M, gap) | partial τ(M, gap \\| train loss) | τ(M, clean test loss) | "
        "Ψ_run(M) | Ψ_epochs(M) | τ(B, gap) | partial τ(B) | B ≥ test loss | slope κ vs √C | sd(slack)/sd(target) |"
    )
    lines = [head, "|---" * 13 + "|"]
    for setting, size in _setting_keys(c):
        g = c[(c["setting"] == setting) & (c["size"] == size)]
        root_c = math.sqrt(float(frame[frame["setting"] == setting]["bound_C"].iloc[0]))

        def m(col: str, _g: pd.DataFrame = g) -> str:
            v = float(_nanmean(_g[col])) if col in _g else math.nan
            return "–" if not math.isfinite(v) else f"{v:.2f}"

        lines.append(
            f"| {setting} | {size} | {m('tau/measure/gap')} | {m('rho/measure/gap')} | {m('ptau/measure/gap')} | "
            f"{m('tau/measure/test_loss')} | {m('psi_run/measure/gap')} | {m('psi_epochs/measure/gap')} | "
            f"{m('tau/bound/gap')} | {m('ptau/bound/gap')} | {100 * float(_nanmean(g['bound_holds'])):.0f} % | "
            f"{m('gap_slope')} vs {root_c:.2f} | {m('slack_sd_ratio')} |"
        )
    return "\n".join(lines)


def summarise(table: pd.DataFrame, value: str = "regret") -> pd.DataFrame:
    """Mean, sd, 95 % CI half-width and n over seeds, per (setting, size, arm, criterion)."""
    rows = []
    for key, group in table.groupby(["setting", "size", "arm", "criterion"], sort=False):
        mean, sd, half, n = _ci(group[value])
        rows.append(
            {
                **dict(zip(["setting", "size", "arm", "criterion"], key, strict=True)),
                "mean": mean,
                "sd": sd,
                "ci": half,
                "n": n,
                "max": float(group[value].max()),
            }
        )
    return pd.DataFrame(rows)


def paired_vs(table: pd.DataFrame, ref: str = "val_acc", arm: str = "tv", by: str | None = None) -> pd.DataFrame:
    """Regret of each criterion minus the regret of ``ref`` on the same search, pooled over the
    searches of ``arm`` (optionally per ``by``): mean, 95 % t-interval, wins/ties/losses."""
    t = table[(table["arm"] == arm) & table["regret"].notna()]
    base = t[t["criterion"] == ref].set_index(SEARCH)["regret"]
    rows = []
    groups = t.groupby(by, sort=False) if by else [("all", t)]
    for level, g in groups:
        for crit, c in g.groupby("criterion", sort=False):
            d = c.set_index(SEARCH)["regret"] - base.reindex(c.set_index(SEARCH).index)
            d = d.dropna().to_numpy()
            mean, _sd, half, n = _ci(d)
            rows.append(
                {
                    "group": level,
                    "criterion": crit,
                    "delta": mean,
                    "ci": half,
                    "n": n,
                    "wins": int((d < -1e-9).sum()),
                    "ties": int((np.abs(d) <= 1e-9).sum()),
                    "losses": int((d > 1e-9).sum()),
                }
            )
    return pd.DataFrame(rows)


def structure_test_markdown(frame: pd.DataFrame, arm: str = "tv") -> str:
    """How often ``noise_switch``'s test flags class-dependent noise, per noise kind."""
    flagged: dict[str, list[float]] = {}
    for key, group in _searches(frame[frame["arm"] == arm]):
        kind = "clean" if key[0] == "clean" else str(key[0]).rstrip("0123456789")
        flagged.setdefault(kind, []).append(structure_p_value(group.reset_index(drop=True)))
    lines = [f"| noise | searches flagged (p < {STRUCTURE_ALPHA}) | median p |", "|---|---|---|"]
    for kind, values in flagged.items():
        p = np.array(values)
        lines.append(f"| {kind} | {int((p < STRUCTURE_ALPHA).sum())}/{p.size} | {np.nanmedian(p):.2g} |")
    return "\n".join(lines)


def paired_markdown(paired: pd.DataFrame) -> str:
    groups = list(dict.fromkeys(paired["group"]))
    lines = [
        "| criterion | " + " | ".join(f"{g}: Δ regret (W/T/L)" for g in groups) + " |",
        "|---" * (len(groups) + 1) + "|",
    ]
    for c in [c for c in ORDER if c in set(paired["criterion"])]:
        cells = []
        for g in groups:
            r = paired[(paired["criterion"] == c) & (paired["group"] == g)]
            if not len(r):
                cells.append("–")
                continue
            r = r.iloc[0]
            cells.append(f"{_fmt(r['delta'], r['ci'])} ({r['wins']}/{r['ties']}/{r['losses']})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- no validation split


def no_val_table(frame: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, size, seed) with both arms: delivered clean accuracy of
    (a) a criterion on pool-trained candidates, (b) val_acc on train-part candidates,
    (c) the val_acc pick(s) retrained on the pool (same config and epochs), and the pool oracle."""
    rows = []
    for key, group in frame.groupby(["setting", "size", "seed"]):
        tv = group[group["arm"] == "tv"].reset_index(drop=True)
        pool = group[group["arm"] == "pool"].reset_index(drop=True)
        if tv.empty or pool.empty:
            continue
        base = dict(zip(["setting", "size", "seed"], key, strict=True))
        picks = pick("val_acc", tv, None)
        b = delivered(tv, picks)
        lookup = pool.set_index(["run", "epochs"])["test_acc"]
        retrained = [lookup.get((tv["run"][i], tv["epochs"][i]), math.nan) for i in picks]
        c = float(_nanmean(retrained))
        rows.append({**base, "procedure": "(b) val_acc, train part", "acc": b})
        rows.append({**base, "procedure": "(c) val_acc → retrain on pool", "acc": c})
        rows.append({**base, "procedure": "oracle (pool)", "acc": float(pool["test_acc"].max())})
        rows.append({**base, "procedure": "median config (pool)", "acc": float(pool["test_acc"].median())})
        sel = table[
            (table["arm"] == "pool")
            & (table["setting"] == key[0])
            & (table["size"] == key[1])
            & (table["seed"] == key[2])
        ]
        for _, r in sel.iterrows():
            if r["needs_val"] or r["criterion"] == "random" or r.get("reference") is True:
                continue
            rows.append({**base, "procedure": f"(a) {r['criterion']} on pool", "acc": r["acc"]})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    ref = out[out["procedure"] == "(b) val_acc, train part"].set_index(["setting", "size", "seed"])["acc"]
    refc = out[out["procedure"] == "(c) val_acc → retrain on pool"].set_index(["setting", "size", "seed"])["acc"]
    idx = list(zip(out["setting"], out["size"], out["seed"], strict=True))
    out["delta_b"] = out["acc"].to_numpy() - ref.reindex(idx).to_numpy()
    out["delta_c"] = out["acc"].to_numpy() - refc.reindex(idx).to_numpy()
    return out


def subsearch_table(
    frame: pd.DataFrame, criteria: list[str], k: int, draws: int = 200, arm: str = "tv"
) -> pd.DataFrame:
    """Random sub-searches of k runs (all their checkpoints): mean regret per criterion and the
    fraction of sub-searches in which it does at least as well as val_acc (a-priori criteria only)."""
    rows = []
    for key, group in _searches(frame[frame["arm"] == arm]):
        runs = np.sort(group["run"].unique())
        if len(runs) <= k:
            continue
        rng = np.random.default_rng(zlib.crc32(repr(key).encode()))  # str hash() changes per process
        regrets: dict[str, list[float]] = {c: [] for c in criteria}
        for _ in range(draws):
            chosen = rng.choice(runs, size=k, replace=False)
            sub = group[group["run"].isin(chosen)].reset_index(drop=True)
            oracle = sub["test_acc"].max()
            for c in criteria:
                regrets[c].append(oracle - delivered(sub, pick(c, sub, None)))
        ref = np.array(regrets.get("val_acc", [math.nan] * draws))
        for c in criteria:
            r = np.array(regrets[c])
            rows.append(
                {
                    **dict(zip(SEARCH, key, strict=True)),
                    "criterion": c,
                    "k": k,
                    "regret": float(_nanmean(r)),
                    "p_le_val": float(np.mean(r <= ref + 1e-12)) if np.isfinite(ref).all() else math.nan,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures


def draw_figures(frame: pd.DataFrame, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    tv = frame[frame["arm"] == "tv"]
    settings = [s for s in dict.fromkeys(tv["setting"])]
    for x, y, name, xlabel, ylabel, diag in (
        (
            "measure",
            "gap",
            "measure_vs_gap.png",
            "M (Hessian distance measure)",
            "gap = noisy test CE − train CE",
            False,
        ),
        (
            "bound",
            "test_bound_loss_noisy",
            "bound_vs_test_loss.png",
            "B = L̂ + √C·M",
            "same loss on noisy test labels",
            True,
        ),
    ):
        sizes = list(dict.fromkeys(tv["size"]))
        fig, axes = plt.subplots(
            len(sizes),
            len(settings),
            figsize=(2.4 * len(settings) + 1.0, 2.4 * len(sizes)),
            squeeze=False,
            constrained_layout=True,
        )
        for i, size in enumerate(sizes):
            for j, setting in enumerate(settings):
                ax = axes[i][j]
                g = tv[(tv["setting"] == setting) & (tv["size"] == size)]
                if g.empty:
                    ax.axis("off")
                    continue
                sc = ax.scatter(g[x], g[y], c=g["memorized"], s=5, cmap="viridis", vmin=0, vmax=1)
                if diag:
                    lo, hi = float(min(g[x].min(), g[y].min())), float(max(g[x].max(), g[y].max()))
                    ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
                tau = np.mean([kendall_tau(s[x], s[y]) for _, s in g.groupby("seed")])
                ax.set_title(f"{setting} {size}\nτ={tau:.2f}", fontsize=7)
                ax.tick_params(labelsize=6)
                if i == len(sizes) - 1:
                    ax.set_xlabel(xlabel, fontsize=6)
                if j == 0:
                    ax.set_ylabel(ylabel, fontsize=6)
        fig.colorbar(sc, ax=axes, shrink=0.6).set_label("memorised fraction of noisy labels", fontsize=7)
        path = folder / name
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    headline = tv[(tv["setting"] == "symmetric40") & (tv["size"] == "full")]
    if not headline.empty:
        fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.0), constrained_layout=True)
        for ax, (col, label) in zip(
            axes,
            (
                ("bound", "B (lower = picked)"),
                ("measure", "M (lower = picked)"),
                ("val_acc", "noisy val acc (higher = picked)"),
            ),
            strict=True,
        ):
            sc = ax.scatter(
                headline[col], headline["test_acc"], c=headline["memorized"], s=6, cmap="viridis", vmin=0, vmax=1
            )
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel("clean test accuracy", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(sc, ax=axes, shrink=0.8).set_label("memorised fraction", fontsize=7)
        fig.suptitle("symmetric 40 %, full size, tv arm: every candidate of the 3 seeds", fontsize=9)
        path = folder / "criteria_vs_test_acc.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------- report


def _fmt(mean: float, half: float, scale: float = 100.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "–"
    if not math.isfinite(half):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


ORDER = [
    "val_acc",
    "val_acc_corr",
    "val_corr_band_bound",
    "val_loss",
    "val_band_bound",
    "val_band_bound_unpaired",
    "val_band_measure",
    "val_band_bound_tuned",
    "noise_switch",
    "noise_case_switch",
    "val_acc_corr_vote",
    "val_acc_eb",
    "val_acc_smooth",
    "val_acc_clean",
    "val_bound_loss",
    "bound",
    "bound_floor",
    "guard_bound",
    "guard_measure",
    "measure_at_fit",
    "measure",
    "bound_weight_tuned",
    "bound_calibrated",
    "bound_trunc",
    "bound_cons",
    "guard_train_loss",
    "distance",
    "train_loss",
    "random",
    "hessian_best",
    "hessian_best_labelfree",
    "ideal_bound",
    "ideal_clean_loss",
    "ideal_noisy_acc",
]


def regret_markdown(summary: pd.DataFrame, arm: str) -> str:
    """Criteria × (setting, size): mean regret ± 95 % CI half-width over seeds, in points."""
    s = summary[summary["arm"] == arm]
    cols = list(dict.fromkeys(zip(s["setting"], s["size"], strict=True)))
    lines = ["| criterion | " + " | ".join(f"{a} {b}" for a, b in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for c in ORDER:
        cells = []
        for setting, size in cols:
            r = s[(s["criterion"] == c) & (s["setting"] == setting) & (s["size"] == size)]
            cells.append(_fmt(float(r["mean"].iloc[0]), float(r["ci"].iloc[0])) if len(r) else "–")
        if any(cell != "–" for cell in cells):
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correlation_markdown(corr: pd.DataFrame, setting: str, size: str, arm: str = "tv") -> str:
    g = corr[(corr["setting"] == setting) & (corr["size"] == size) & (corr["arm"] == arm)]
    head = "| measure | τ gap | ρ gap | partial τ gap \\| train loss | τ clean test loss | Ψ run | Ψ epochs |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for m in MEASURES:
        if f"tau/{m}/gap" not in g:
            continue

        def cell(col: str, _g: pd.DataFrame = g) -> str:
            mean, _sd, half, _n = _ci(_g[col])
            return _fmt(mean, half, scale=1.0, digits=2)

        lines.append(
            f"| {m} | {cell(f'tau/{m}/gap')} | {cell(f'rho/{m}/gap')} | {cell(f'ptau/{m}/gap')} | "
            f"{cell(f'tau/{m}/test_loss')} | {cell(f'psi_run/{m}/gap')} | {cell(f'psi_epochs/{m}/gap')} |"
        )
    return "\n".join(lines)


def no_val_markdown(nv: pd.DataFrame) -> str:
    lines = []
    for (setting, size), g in nv.groupby(["setting", "size"], sort=False):
        lines += [
            f"\n**{setting}, {size}** (n seeds = {g['seed'].nunique()})\n",
            "| procedure | clean acc (mean ± CI) | Δ vs (b) | Δ vs (c) | per seed |",
            "|---|---|---|---|---|",
        ]
        stats = []
        for proc, p in g.groupby("procedure"):
            m, _, h, _ = _ci(p["acc"])
            db, _, hb, _ = _ci(p["delta_b"])
            dc, _, hc, _ = _ci(p["delta_c"])
            stats.append(
                (m, proc, h, db, hb, dc, hc, " / ".join(f"{a * 100:.1f}" for a in p.sort_values("seed")["acc"]))
            )
        for m, proc, h, db, hb, dc, hc, per in sorted(stats, key=lambda t: -t[0]):
            lines.append(f"| {proc} | {_fmt(m, h)} | {_fmt(db, hb)} | {_fmt(dc, hc)} | {per} |")
    return "\n".join(lines)


NO_VAL_ROWS = [
    "oracle (pool)",
    "(c) val_acc → retrain on pool",
    "(b) val_acc, train part",
    "(a) bound on pool",
    "(a) bound_trunc on pool",
    "(a) bound_floor on pool",
    "(a) measure_at_fit on pool",
    "(a) bound_weight_tuned on pool",
    "(a) measure on pool",
    "(a) guard_train_loss on pool",
    "median config (pool)",
]


def no_val_key_markdown(nv: pd.DataFrame) -> str:
    """Procedures × (setting, size): delivered clean accuracy (mean ± CI) and Δ vs (b) in points."""
    keys = _setting_keys(nv)
    lines = [
        "| procedure | " + " | ".join(f"{a} {b}: acc (Δ vs b)" for a, b in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for proc in NO_VAL_ROWS:
        cells = []
        for setting, size in keys:
            g = nv[(nv["setting"] == setting) & (nv["size"] == size) & (nv["procedure"] == proc)]
            if g.empty:
                cells.append("–")
                continue
            m, _, h, _ = _ci(g["acc"])
            d, _, hd, _ = _ci(g["delta_b"])
            cells.append(f"{_fmt(m, h)} ({d * 100:+.1f} ± {hd * 100:.1f})" if math.isfinite(hd) else _fmt(m, h))
        lines.append(f"| {proc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def splice(text: str, blocks: dict[str, str]) -> str:
    """Replace every ``<!-- begin:NAME -->…<!-- end:NAME -->`` block of ``text`` with ``blocks[NAME]``."""
    for name, body in blocks.items():
        begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{begin}\n{body}\n{end}{tail}"
    return text


def key_lines(corr: pd.DataFrame, table: pd.DataFrame, nv: pd.DataFrame) -> list[str]:
    """The issue's KEY: VALUE lines, means over seeds, tv arm. Unsuffixed keys: symmetric 40 %,
    full size (the headline setting); ``_half``: half size; ``_pair``/``_correlated``: the
    other noise kinds at 40 %."""
    out: dict[str, Any] = {}

    def mean(values: Any) -> float:
        return float(_nanmean(values)) if len(values) else math.nan

    combos = [
        (setting, size, kind_suffix + size_suffix)
        for setting, kind_suffix in (("symmetric40", ""), ("pair40", "_pair"), ("correlated40", "_correlated"))
        for size, size_suffix in (("full", ""), ("half", "_half"))
    ]
    for setting, size, suffix in combos:
        c = corr[(corr["setting"] == setting) & (corr["size"] == size) & (corr["arm"] == "tv")]
        t = table[(table["setting"] == setting) & (table["size"] == size) & (table["arm"] == "tv")]
        if c.empty:
            continue
        out[f"kendall_tau_measure_gap_noise40{suffix}"] = mean(c["tau/measure/gap"])
        out[f"partial_tau_measure_gap_noise40{suffix}"] = mean(c["ptau/measure/gap"])
        out[f"kendall_tau_bound_gap_noise40{suffix}"] = mean(c["tau/bound/gap"])
        hb = t[t["criterion"] == "hessian_best"]
        out[f"regret_hessian_noise40{suffix}"] = mean(hb["regret"])
        out[f"hessian_criterion_noise40{suffix}"] = ",".join(
            sorted(set(hb.get("chosen", pd.Series(dtype=str)).dropna()))
        )
        hl = t[t["criterion"] == "hessian_best_labelfree"]
        out[f"regret_hessian_labelfree_noise40{suffix}"] = mean(hl["regret"])
        out[f"hessian_labelfree_criterion_noise40{suffix}"] = ",".join(
            sorted(set(hl.get("chosen", pd.Series(dtype=str)).dropna()))
        )
        for name in ("bound", "bound_trunc", "measure", "bound_floor", "measure_at_fit", "val_band_bound"):
            out[f"regret_{name}_noise40{suffix}"] = mean(t[t["criterion"] == name]["regret"])
        out[f"regret_val_noisy_noise40{suffix}"] = mean(t[t["criterion"] == "val_acc"]["regret"])
        out[f"bound_holds_fraction_noise40{suffix}"] = mean(c["bound_holds"])
        n = nv[(nv["setting"] == setting) & (nv["size"] == size)] if not nv.empty else nv
        if not n.empty:
            for proc, label in (
                ("(b) val_acc, train part", "noval_val_split_acc"),
                ("(c) val_acc → retrain on pool", "noval_val_retrain_acc"),
            ):
                out[f"{label}_noise40{suffix}"] = mean(n[n["procedure"] == proc]["acc"])
            for crit in ("bound", "bound_trunc", "measure_at_fit", "bound_weight_tuned"):
                out[f"noval_{crit}_pool_acc_noise40{suffix}"] = mean(n[n["procedure"] == f"(a) {crit} on pool"]["acc"])
    tv = table[(table["arm"] == "tv") & table["regret"].notna()]
    base = tv[tv["criterion"] == "val_acc"].set_index(SEARCH)["regret"]
    for name in ("bound", "bound_trunc", "val_band_bound"):
        d = tv[tv["criterion"] == name].set_index(SEARCH)["regret"] - base
        out[f"delta_regret_{name}_vs_val_all"] = mean(d.dropna())
        out[f"searches_{name}_better_than_val_all"] = f"{int((d < -1e-9).sum())}/{int(d.notna().sum())}"
    lines = []
    for k, v in out.items():
        lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return lines


def analyze(
    out: Path,
    *,
    stores: list[Path] = (),  # type: ignore[assignment]
    title: str = "",
    figures: Path | None = None,
    subsearch_k: int | None = 6,
    raw_dirs: list[Path] = (),  # type: ignore[assignment]
    docs: Path | None = None,
    compare_with: Path | None = None,
) -> list[str]:
    """Everything from ``out/runs.jsonl`` (or an existing ``trials.csv``): tables.md, summary.json,
    selection.csv, correlations.csv, figures; returns the printed summary lines. ``compare_with``:
    another study's output folder (the digits study's), set next to this one for an estimated-F study."""
    trials_path = out / "trials.csv"
    existing = [store for store in stores if store.is_file()]
    frame = write_trials(out, existing, list(raw_dirs)) if existing else load_trials(trials_path)
    frame = complete_searches(frame)
    estimated = ef.is_estimated(frame)
    if estimated:  # criteria see what the product would give them: the guarded estimate
        frame = ef.guarded(frame)
        frame = ef.with_noise_case(frame, out / "noise_case.csv")
        subsearch_k = None  # searches of 6 runs: a sub-search of 6 is the search
    else:  # the F the runs used was revealed: its structure is what the product's report reads
        frame = ef.with_noise_case_of_runs_f(frame, out / "val_labels.json")
    corr = correlation_table(frame)
    table = selection_table(frame)
    summ = summarise(table)
    nv = no_val_table(frame, table)
    fig_paths = draw_figures(frame, figures) if figures is not None else []
    parts = [
        f"# Selection study: {title or out.name}",
        "",
        f"{frame['search'].nunique()} searches, {len(frame)} candidates.",
        "",
    ]
    for arm in ("tv", "pool"):
        if (summ["arm"] == arm).any():
            parts += [f"## Regret (points of clean test accuracy), arm {arm}", "", regret_markdown(summ, arm), ""]
    for (setting, size), _ in corr[corr["arm"] == "tv"].groupby(["setting", "size"], sort=False):
        parts += [f"## Correlations, {setting} {size} (tv arm)", "", correlation_markdown(corr, setting, size), ""]
        bh = corr[(corr["setting"] == setting) & (corr["size"] == size) & (corr["arm"] == "tv")]["bound_holds"]
        sel = corr[(corr["setting"] == setting) & (corr["size"] == size) & (corr["arm"] == "tv")]
        parts += [
            f"B ≥ noisy test loss (same loss) in {bh.mean() * 100:.0f} % of candidates (per seed: "
            + " / ".join(f"{v * 100:.0f}" for v in bh)
            + f"). B's loss gap vs M: Pearson r = {sel['pearson_gapB_measure'].mean():.2f}, slope κ = "
            + " / ".join(f"{v:.2f}" for v in sel["gap_slope"])
            + f" per seed, against √C = {math.sqrt(float(frame[frame['setting'] == setting]['bound_C'].iloc[0])):.2f}; "
            + f"sd(B − target)/sd(target) = {sel['slack_sd_ratio'].mean():.1f}, "
            + f"τ(B, target) = {sel['tau_bound_target'].mean():.2f}, τ(noisy-val loss, target) = "
            + f"{sel['tau_val_target'].mean():.2f}.",
            "",
        ]
    table["kind"] = table["setting"].map(lambda x: "clean" if x == "clean" else x.rstrip("0123456789"))
    paired = pd.concat([paired_vs(table, by="kind"), paired_vs(table, by="size"), paired_vs(table)], ignore_index=True)
    parts = [
        *parts[:4],
        "## Key regret table (tv arm; points of clean test accuracy, mean ± 95 % CI over seeds)",
        "",
        "<!-- table:key-regret -->",
        key_regret_markdown(summ),
        "",
        "## Measure vs gap, every setting (tv arm, means over seeds)",
        "",
        correlation_summary_markdown(corr, frame),
        "",
        *parts[4:],
    ]
    parts += [
        "## Regret minus val_acc's regret on the same search (tv arm, points; W/T/L = searches where the "
        "criterion is better / equal / worse)",
        "",
        paired_markdown(paired),
        "",
        "## noise_switch's test: searches where the top candidate's errors are uneven across classes (tv arm)",
        "",
        structure_test_markdown(frame),
        "",
    ]
    if not nv.empty:
        parts += ["## No validation split (pool arm)", no_val_markdown(nv), ""]
    sub = pd.DataFrame()
    if subsearch_k:
        apriori = [c for c in CRITERIA if c not in TUNED]
        sub = subsearch_table(frame, apriori, subsearch_k)
        if not sub.empty:
            agg = (
                sub.groupby(["setting", "size", "criterion"], sort=False)
                .agg(regret=("regret", "mean"), p=("p_le_val", "mean"))
                .reset_index()
            )
            parts += [f"## Sub-searches of {subsearch_k} runs (tv arm): mean regret / P(regret ≤ val_acc's)", ""]
            cols = list(dict.fromkeys(zip(agg["setting"], agg["size"], strict=True)))
            parts += ["| criterion | " + " | ".join(f"{a} {b}" for a, b in cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for c in [c for c in ORDER if c in set(agg["criterion"])]:
                cells = []
                for s_, z_ in cols:
                    r = agg[(agg["criterion"] == c) & (agg["setting"] == s_) & (agg["size"] == z_)]
                    cells.append(f"{r['regret'].iloc[0] * 100:.1f} / {r['p'].iloc[0]:.2f}" if len(r) else "–")
                parts.append(f"| {c} | " + " | ".join(cells) + " |")
            parts.append("")
    keys = key_lines(corr, table, nv)
    extra_blocks: dict[str, str] = {}
    if estimated:
        true_table = selection_table(ef.true_f_frame(frame, out / "val_labels.json"))
        cost = ef.estimation_cost(table, true_table)
        residual = _residual_taus(frame)
        criteria = [
            *KEY_CRITERIA,
            "val_acc_corr",
            "val_corr_band_bound",
            "val_acc_eb",
            "val_acc_smooth",
            "val_acc_clean",
            "noise_switch",
            "noise_case_switch",
        ]
        extra = ef.markdown(summ, cost, ef.f_error_table(frame), residual, criteria)
        parts += [extra, ""]
        keys = [*keys, *ef.key_lines(corr, summ, table, nv, frame)]
        cost.to_csv(out / "estimation_cost.csv", index=False, float_format="%.4g")
        extra_blocks = {"estimated-f": extra}
        if compare_with is not None and (compare_with / "selection.csv").is_file():
            other = tuple(pd.read_csv(compare_with / f"{name}.csv") for name in ("correlations", "selection", "no_val"))
            side = ef.side_by_side((corr, table, nv), other)  # type: ignore[arg-type]
            parts += ["## Digits against Fashion-MNIST: which conclusions transfer", "", side, ""]
            extra_blocks["side-by-side"] = side
    blocks = {
        "key-regret": key_regret_markdown(summ),
        "correlations": correlation_summary_markdown(corr, frame),
        "headline-correlations": correlation_markdown(corr, "symmetric40", "full"),
        "paired": paired_markdown(paired),
        "no-val": no_val_key_markdown(nv) if not nv.empty else "",
        "keys": "```\n" + "\n".join(keys) + "\n```",
    }
    if estimated:  # the estimated-F study's blocks have their own names, never the digits study's
        blocks = {f"fashion-{name}": body for name, body in {**blocks, **extra_blocks}.items()}
    if docs is not None and docs.is_file():
        docs.write_text(splice(docs.read_text(), blocks))
    (out / "tables.md").write_text("\n".join(parts) + "\n")
    corr.to_csv(out / "correlations.csv", index=False, float_format="%.4g")
    table.to_csv(out / "selection.csv", index=False, float_format="%.4g")
    paired.to_csv(out / "paired.csv", index=False, float_format="%.4g")
    if not nv.empty:
        nv.to_csv(out / "no_val.csv", index=False, float_format="%.4g")
    if not sub.empty:
        sub.to_csv(out / "subsearch.csv", index=False, float_format="%.4g")
    (out / "summary.json").write_text(json.dumps({k: v for k, v in (line.split(": ", 1) for line in keys)}, indent=1))
    return [*parts, *(f"figure: {p}" for p in fig_paths), "", *keys]
