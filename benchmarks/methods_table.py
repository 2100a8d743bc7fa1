"""Clean test accuracy of plain fine-tuning, REGSL, NSO and training from scratch on ``digits``.

The built-in task (digits 5–9, 40 % symmetric noise on train and validation labels, clean test),
timm ``test_resnet``. For every seed s (the training seed *and* ``task.split_seed``, so the split
and the noise draw change with it) and every arm:

1. train each configuration of the arm's grid once, for max(epoch grid) epochs;
2. the candidates are (configuration, epoch count) for every epoch count in the epoch grid: with
   the default ``schedule: none`` a run of E epochs is exactly the first E epochs of a longer run;
3. pick the candidate with the highest NOISY validation accuracy (ties: lower noisy validation
   loss, then the earlier candidate); the clean test set is never used for any choice;
4. report the picked candidate's clean test accuracy, then mean ± std (ddof = 1) over seeds.

Every arm gets the same budget: the same number of configurations (9 by default) and the same
epoch grid. The grids are below (``DEFAULT_ARMS``); ``docs/methods.md`` explains them.

    uv run python benchmarks/methods_table.py                       # 4 arms, 108 runs (CPU, ~50 min)
    uv run python benchmarks/methods_table.py --quick               # smoke run (~1 min)
    uv run python benchmarks/methods_table.py --arms plain,nso --set nso:nso.sigma=0.01,0.02
    uv run python benchmarks/methods_table.py --grid my_grids.yaml --json out.json

``--grid FILE.yaml`` replaces arms wholesale: ``{arm: {label: str, fixed: {key: value},
grid: {key: [values]}, default: {key: value}}}`` with dotted run-config keys. ``--set
ARM:KEY=V1[,V2,...]`` sets one key of one arm: one value fixes it, several make it a grid axis.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from trainables.config import RunConfig
from trainables.data import TaskData, load_task
from trainables.loop import DivergedError, fine_tune

LR3 = (1e-4, 3e-4, 1e-3)
LR9 = (3e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 3e-3)
EPOCH_GRID = (5, 10, 15, 20, 25, 30)
KEPT = (
    "train_acc",
    "train_acc_clean",
    "val_acc",
    "val_loss",
    "test_acc",
    "memorized",
    "epoch_s",
    "distance",
    "dist/head",
    "sl_precision",
    "sl_recall",
    "sl_changed",
)


@dataclass(frozen=True)
class Arm:
    """One method: fixed run-config overrides, a grid of values, and its untuned default point."""

    name: str
    label: str
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    default: dict[str, Any] = field(default_factory=dict)  # a grid point, shown at 10 epochs

    def configs(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]


REGSL_FIXED: dict[str, Any] = {
    "constraint.enabled": True,
    "constraint.mode": "projection",
    "constraint.growth": 1.5,
    "constraint.head_radius": 1.0,
    "constraint.head_from_zero": False,
    "self_label.enabled": True,
    "self_label.threshold": 0.9,
    "self_label.correct_start": 10,
    "self_label.reweight_start": 5,
    "self_label.temperature": 2.0,
}

DEFAULT_ARMS: dict[str, Arm] = {
    "plain": Arm("plain", "plain fine-tuning", {}, {"optim.lr": LR9}, {"optim.lr": 1e-3}),
    "regsl": Arm(
        "regsl",
        "REGSL (constraint + self-labeling)",
        REGSL_FIXED,
        {"optim.lr": LR3, "constraint.radius": (0.1, 0.3, 1.0)},
        {"optim.lr": 1e-3, "constraint.radius": 0.3},
    ),
    "nso": Arm(
        "nso",
        "NSO (k = 1, two-point)",
        {"nso.enabled": True, "nso.k": 1, "nso.lam": 0.0},
        {"optim.lr": LR3, "nso.sigma": (0.01, 0.02, 0.04)},
        {"optim.lr": 1e-3, "nso.sigma": 0.01},
    ),
    "scratch": Arm(
        "scratch", "plain, from scratch", {"model.pretrained": "none"}, {"optim.lr": LR9}, {"optim.lr": 1e-3}
    ),
    "sam": Arm(
        "sam",
        "SAM (extra)",
        {"sam.enabled": True},
        {"optim.lr": LR3, "sam.rho": (0.02, 0.05, 0.1)},
        {"optim.lr": 1e-3, "sam.rho": 0.05},
    ),
    "consistent": Arm(
        "consistent",
        "consistent loss, known F (extra)",
        {"consistent.enabled": True, "consistent.transition": "symmetric"},
        {"optim.lr": LR9},
        {"optim.lr": 1e-3},
    ),
}


@dataclass
class Candidate:
    """One (configuration, epoch count) of one arm at one seed, with its metrics."""

    arm: str
    seed: int
    config: dict[str, Any]
    epoch: int
    metrics: dict[str, float]
    epoch_s: float  # mean training seconds per epoch of the run

    @property
    def key(self) -> tuple[float, float]:
        return (self.metrics["val_acc"], -self.metrics["val_loss"])


# -- running ------------------------------------------------------------------------------------
def base_config(seed: int, epochs: int, threads: int, device: str) -> RunConfig:
    return RunConfig().replace(
        **{
            "seed": seed,
            "task.split_seed": seed,
            "epochs": epochs,
            "threads": threads,
            "device": device,
            "measure.enabled": False,
        }
    )


def run_curve(cfg: RunConfig, data: TaskData) -> list[dict[str, float]]:
    """Per-epoch metrics (the ``KEPT`` subset) of one run; empty when it diverged."""
    curve = []
    try:
        for result in fine_tune(cfg, data=data, log=lambda _: None):
            curve.append({k: float(result.metrics.get(k, math.nan)) for k in KEPT})
    except DivergedError:
        return []
    return curve


Curves = dict[str, list[dict[str, float]]]  # configuration id → per-epoch metrics ([] = diverged)


def train_arm(arm: Arm, seed: int, data: TaskData, base: RunConfig) -> Curves:
    """Train every configuration of ``arm`` once; their full per-epoch curves."""
    curves = {}
    for config in arm.configs():
        tic = time.perf_counter()
        cfg = base.replace(**arm.fixed, **config)
        if cfg.optim.schedule == "cosine" or (cfg.nso.enabled and cfg.nso.schedule != "constant"):
            _progress(
                f"warning: {arm.name} {_config_id(config)}: its schedule depends on the total epoch "
                "count, so an early epoch of this run is not a shorter run"
            )
        curve = run_curve(cfg, data)
        curves[_config_id(config)] = curve
        _progress(
            f"seed {seed} {arm.name:<10} {_config_id(config):<40} "
            f"{time.perf_counter() - tic:6.1f} s" + ("" if curve else "  DIVERGED")
        )
    return curves


def candidates(arm: Arm, seed: int, curves: Curves, epoch_grid: Sequence[int]) -> list[Candidate]:
    """(configuration, epoch count) candidates of one arm at one seed, in grid order."""
    out = []
    for config in arm.configs():
        curve = curves.get(_config_id(config))
        if curve is None:
            raise SystemExit(f"no saved curve for {arm.name} seed {seed} {_config_id(config)}")
        if not curve:
            continue
        epoch_s = statistics.fmean(m["epoch_s"] for m in curve)
        out += [Candidate(arm.name, seed, config, e, curve[e - 1], epoch_s) for e in epoch_grid]
    return out


def select(candidates: Iterable[Candidate]) -> Candidate:
    """Highest noisy-val accuracy; ties → lower noisy-val loss → first in grid order."""
    best: Candidate | None = None
    for cand in candidates:
        if best is None or cand.key > best.key:
            best = cand
    if best is None:
        raise RuntimeError("every configuration of the arm diverged")
    return best


def default_point(arm: Arm, candidates: list[Candidate], epoch: int = 10) -> Candidate | None:
    for cand in candidates:
        point = {**arm.fixed, **cand.config}
        if cand.epoch == epoch and all(point.get(k) == v for k, v in arm.default.items()):
            return cand
    return None


# -- reporting ----------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def results_table(arms: dict[str, Arm], picked: dict[str, list[Candidate]]) -> str:
    head = (
        "| arm | clean test acc % | noisy val acc % | memorised % | train acc % (noisy labels) "
        "| s / epoch | picked (per seed) |\n|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, cands in picked.items():
        picks = "; ".join(f"{_config_id(c.config)} @{c.epoch}" for c in cands)
        rows.append(
            f"| {arms[name].label} | **{fmt([c.metrics['test_acc'] for c in cands])}** "
            f"| {fmt([c.metrics['val_acc'] for c in cands])} "
            f"| {fmt([c.metrics['memorized'] for c in cands])} "
            f"| {fmt([c.metrics['train_acc'] for c in cands])} | {fmt([c.epoch_s for c in cands], 1.0, 2)} "
            f"| {picks} |"
        )
    return "\n".join(rows)


def defaults_table(arms: dict[str, Arm], defaults: dict[str, list[Candidate]], epoch: int) -> str:
    rows = [
        f"| arm (untuned point; {epoch} epochs) | clean test acc % | noisy val acc % | memorised % |",
        "|---|---|---|---|",
    ]
    for name, cands in defaults.items():
        if cands:
            rows.append(
                f"| {arms[name].label}: {_config_id(cands[0].config)} "
                f"| {fmt([c.metrics['test_acc'] for c in cands])} "
                f"| {fmt([c.metrics['val_acc'] for c in cands])} "
                f"| {fmt([c.metrics['memorized'] for c in cands])} |"
            )
    return "\n".join(rows)


def curves_table(
    picked: dict[str, list[Candidate]], curves: dict[tuple[str, int], Curves], epochs: Sequence[int]
) -> str:
    """Mean over seeds of each arm's picked configuration's curve: test acc / memorised %."""
    rows = ["| arm \\ epoch | " + " | ".join(map(str, epochs)) + " |", "|---" * (len(epochs) + 1) + "|"]
    for name, cands in picked.items():
        runs = [curves[(name, c.seed)][_config_id(c.config)] for c in cands]
        cells = []
        for e in epochs:
            test = statistics.fmean(r[e - 1]["test_acc"] for r in runs)
            mem = statistics.fmean(r[e - 1]["memorized"] for r in runs)
            cells.append(f"{test * 100:.0f} / {mem * 100:.0f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def selection_table(
    arms: dict[str, Arm], picked: dict[str, list[Candidate]], oracle: dict[str, list[Candidate]]
) -> str:
    """Val-selected vs the best clean test accuracy among the same candidates (a diagnostic only)."""
    rows = ["| arm | val-selected % | oracle among its candidates % | regret (points) |", "|---|---|---|---|"]
    for name, cands in picked.items():
        sel = [c.metrics["test_acc"] for c in cands]
        best = [c.metrics["test_acc"] for c in oracle[name]]
        regret = [b - a for a, b in zip(sel, best, strict=True)]
        rows.append(f"| {arms[name].label} | {fmt(sel)} | {fmt(best)} | {fmt(regret)} |")
    return "\n".join(rows)


def paired_pvalue(diffs: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of per-seed differences (nan with < 2 seeds or zero spread)."""
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return math.nan
    from scipy import stats

    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def key_lines(picked: dict[str, list[Candidate]], defaults: dict[str, list[Candidate]]) -> list[str]:
    lines = []
    plain = [c.metrics["test_acc"] for c in picked.get("plain", [])]
    for name, cands in picked.items():
        acc = [c.metrics["test_acc"] for c in cands]
        mean, std = mean_std(acc)
        lines += [
            f"test_acc_{name}: {mean:.4f}",
            f"test_acc_{name}_std: {std:.4f}",
            f"test_acc_{name}_seeds: {','.join(f'{a:.4f}' for a in acc)}",
            f"val_acc_{name}: {mean_std([c.metrics['val_acc'] for c in cands])[0]:.4f}",
            f"memorized_{name}: {mean_std([c.metrics['memorized'] for c in cands])[0]:.4f}",
        ]
        if name != "plain" and len(plain) == len(acc):
            diffs = [a - p for a, p in zip(acc, plain, strict=True)]
            lines += [
                f"delta_{name}_vs_plain: {statistics.fmean(diffs):+.4f}",
                f"wins_{name}_vs_plain: {sum(d > 0 for d in diffs)}/{len(diffs)}",
                f"pvalue_{name}_vs_plain: {paired_pvalue(diffs):.3f}",
            ]
    for name, cands in defaults.items():
        if cands:
            untuned = statistics.fmean(c.metrics["test_acc"] for c in cands)
            lines.append(f"test_acc_{name}_untuned: {untuned:.4f}")
    return lines


# -- arms from the command line -----------------------------------------------------------------
def load_grid_file(path: Path) -> dict[str, Arm]:
    data = yaml.safe_load(path.read_text()) or {}
    arms = {}
    for name, spec in data.items():
        grid = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in (spec.get("grid") or {}).items()}
        arms[name] = Arm(
            name, spec.get("label", name), dict(spec.get("fixed") or {}), grid, dict(spec.get("default") or {})
        )
    return arms


def apply_set(arms: dict[str, Arm], setting: str) -> None:
    """``ARM:KEY=V1[,V2,...]``: one value fixes KEY, several make it a grid axis."""
    arm_name, _, assignment = setting.partition(":")
    key, _, raw = assignment.partition("=")
    if arm_name not in arms or not key or not raw:
        raise SystemExit(f"--set {setting!r}: use ARM:KEY=VALUE[,VALUE...] with ARM in {', '.join(arms)}")
    values = tuple(_parse_value(v) for v in raw.split(","))
    arm = arms[arm_name]
    fixed, grid = dict(arm.fixed), dict(arm.grid)
    fixed.pop(key, None)
    grid.pop(key, None)
    if len(values) == 1:
        fixed[key] = values[0]
    else:
        grid[key] = values
    arms[arm_name] = replace(arm, fixed=fixed, grid=grid)


def _parse_value(text: str) -> Any:
    """A number when it reads as one (YAML alone leaves ``1e-3`` a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def quick_arm(arm: Arm) -> Arm:
    """The arm reduced to its default point (smoke run)."""
    return replace(arm, grid={k: (arm.default.get(k, v[0]),) for k, v in arm.grid.items()})


def _config_id(config: dict[str, Any]) -> str:
    short = {"optim.lr": "lr", "constraint.radius": "D", "nso.sigma": "σ", "sam.rho": "ρ"}
    return (
        ",".join(
            f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}" for k, v in config.items()
        )
        or "-"
    )


def _untuned_epoch(epoch_grid: Sequence[int]) -> int:
    return 10 if 10 in epoch_grid else max(epoch_grid)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arms",
        default="plain,regsl,nso,scratch",
        help=f"comma list from {', '.join(DEFAULT_ARMS)} (or names in --grid)",
    )
    parser.add_argument("--seeds", type=_ints, default=(0, 1, 2))
    parser.add_argument("--epoch-grid", type=_ints, default=EPOCH_GRID)
    parser.add_argument("--grid", type=Path, help="YAML with per-arm fixed values and grids")
    parser.add_argument("--set", action="append", default=[], metavar="ARM:KEY=V[,V...]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="2 seeds, default point only, epochs 2 and 4")
    parser.add_argument("--json", type=Path, help="write every run's per-epoch metrics here")
    parser.add_argument(
        "--from-json", type=Path, help="re-select from curves saved with --json (no training), e.g. another epoch grid"
    )
    return parser.parse_args(argv)


def resolve_arms(args: argparse.Namespace) -> dict[str, Arm]:
    available = {**DEFAULT_ARMS, **(load_grid_file(args.grid) if args.grid else {})}
    names = args.arms.split(",")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown arm {unknown[0]!r}: choose from {', '.join(available)}")
    arms = {n: available[n] for n in names}
    for setting in args.set:
        apply_set(arms, setting)
    return {n: quick_arm(a) for n, a in arms.items()} if args.quick else arms


# -- main ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    picked: dict[str, list[Candidate]]
    oracle: dict[str, list[Candidate]]
    defaults: dict[str, list[Candidate]]


def all_curves(arms: dict[str, Arm], args: argparse.Namespace) -> dict[tuple[str, int], Curves]:
    """Train (or, with ``--from-json``, load) every arm's curves at every seed."""
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        missing = [f"{a}/{s}" for a in arms for s in args.seeds if f"{a}/{s}" not in saved]
        if missing:
            raise SystemExit(f"{args.from_json} has no runs for {missing[0]}")
        return {(a, s): saved[f"{a}/{s}"] for a in arms for s in args.seeds}
    curves = {}
    for seed in args.seeds:
        base = base_config(seed, max(args.epoch_grid), args.threads, args.device)
        data = load_task(base.task)
        for name, arm in arms.items():
            curves[(name, seed)] = train_arm(arm, seed, data, base)
    return curves


def evaluate_arms(arms: dict[str, Arm], curves: dict[tuple[str, int], Curves], args: argparse.Namespace) -> Outcome:
    out = Outcome({n: [] for n in arms}, {n: [] for n in arms}, {n: [] for n in arms})
    untuned_epoch = _untuned_epoch(args.epoch_grid)
    for name, arm in arms.items():
        for seed in args.seeds:
            cands = candidates(arm, seed, curves[(name, seed)], args.epoch_grid)
            out.picked[name].append(select(cands))
            out.oracle[name].append(max(cands, key=lambda c: c.metrics["test_acc"]))
            point = default_point(arm, cands, untuned_epoch)
            out.defaults[name] += [point] if point else []
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.seeds, args.epoch_grid = args.seeds[:2], (2, 4)
    arms = resolve_arms(args)
    torch.set_num_threads(args.threads)
    curves = all_curves(arms, args)
    if args.json:
        args.json.write_text(json.dumps({f"{a}/{s}": c for (a, s), c in curves.items()}, indent=1))
    report(arms, evaluate_arms(arms, curves, args), curves, args)


def report(arms: dict[str, Arm], out: Outcome, curves: dict[tuple[str, int], Curves], args: argparse.Namespace) -> None:
    print(
        f"## Clean test accuracy, val-selected per seed (seeds {list(args.seeds)}, "
        f"epoch grid {list(args.epoch_grid)})\n"
    )
    print(results_table(arms, out.picked))
    print("\n## Selection check: val-selected vs the best clean test among the same candidates\n")
    print(selection_table(arms, out.picked, out.oracle))
    print("\n## Untuned points (no selection)\n")
    print(defaults_table(arms, out.defaults, _untuned_epoch(args.epoch_grid)))
    last = max(args.epoch_grid)
    epochs = [e for e in sorted({1, 2, 3, 5, *args.epoch_grid}) if e <= last]
    print("\n## Curves of the picked configurations: clean test acc % / memorised % (mean over seeds)\n")
    print(curves_table(out.picked, curves, epochs))
    print()
    for line in key_lines(out.picked, out.defaults):
        print(line)


if __name__ == "__main__":
    main()
