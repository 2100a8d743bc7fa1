"""What the study trains: presets, the seeded config sampler, and one job per training run.

A *search* is one (noise setting, data size, seed, arm): ``runs`` configs drawn by the seeded
sampler, each trained once to the last checkpoint and recorded at every checkpoint epoch. A
candidate ("trial") is a (config, epochs) pair: training a config for e epochs is *exactly* the
first e epochs of the longer run (no learning-rate schedule, constant NSO σ, nothing else reads
the total epoch count), so the checkpoints are the epochs axis of the search at no extra
training cost.

Arms:

- ``tv``: trained on the train part, the noisy validation split held out (val-based selection);
- ``pool``: the same configs, same torch seed, trained on train ∪ val, nothing held out (the
  regime a label-free criterion exists for). The (b)→(c) "select on val, retrain on the pool"
  procedure is the pool-arm candidate with the same config and epochs.

The config sample depends on the seed only, so every setting, size and arm of a seed searches
the same configs (paired comparisons). The split and noise draw use ``task.split_seed = seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PRESETS", "SIZES", "Job", "Preset", "Setting", "jobs", "sample_config"]


@dataclass(frozen=True)
class Setting:
    kind: str  # none | symmetric | pair | correlated
    rate: float

    @property
    def name(self) -> str:
        return "clean" if self.kind == "none" else f"{self.kind}{round(self.rate * 100)}"

    @classmethod
    def parse(cls, text: str) -> Setting:
        if text == "clean":
            return cls("none", 0.0)
        for kind in ("symmetric", "pair", "correlated"):
            if text.startswith(kind) and text[len(kind) :].isdigit():
                return cls(kind, int(text[len(kind) :]) / 100)
        raise ValueError(f"unknown setting {text!r}: use clean, symmetricNN, pairNN or correlatedNN")


# Data sizes. ``full``: the task's default split, 448 train / 179 val (pool 627). ``half``: a
# 10 % validation split and 224 training samples (224 / 90, pool 314). ``tiny`` is for the smoke
# run only. The clean test split (269 images) is the same in every size.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"task.val_fraction": 0.2, "task.train_size": None},
    "half": {"task.val_fraction": 0.1, "task.train_size": 224},
    "tiny": {"task.val_fraction": 0.1, "task.train_size": 48},
    # Fashion-MNIST target (classes 5–9): the validation split is 0.4 × the training split, as in
    # digits' sizes; the clean test set is the 5,000 official test images of the target classes
    "f500": {"task.train_size": 500, "task.val_size": 200},
    "f2000": {"task.train_size": 2000, "task.val_size": 800},
}
FASHION = (("task.name", "fashion-mnist"), ("task.noise.reveal", False))  # F estimated, never read


@dataclass(frozen=True)
class Preset:
    """One study: the grid of searches and the size of each search."""

    name: str
    settings: tuple[str, ...]
    sizes: tuple[str, ...]
    seeds: tuple[int, ...]
    arms: tuple[str, ...] = ("tv", "pool")
    runs: int = 12  # configs per search
    checkpoints: tuple[int, ...] = (4, 8, 12, 16, 20)  # epochs at which a candidate is recorded
    # (setting, size) pairs that get only the tv arm (keeps the default under an hour)
    tv_only: tuple[tuple[str, str], ...] = field(default=())
    # settings whose arms differ from ``arms`` (e.g. only the pool arm, the tv arm being elsewhere)
    arms_by_setting: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())
    # (setting, size) pairs not run at all (what a time budget cut)
    skip: tuple[tuple[str, str], ...] = field(default=())
    note: str = ""
    # dotted RunConfig overrides applied to every run after the study's own (another task, model,
    # device or batch size: the GPU recipe), and per size (a real data set's own sizes); empty for
    # the built-in digits presets
    base: tuple[tuple[str, Any], ...] = field(default=())
    size_overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = field(default=())


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "smoke",
            settings=("symmetric40",),
            sizes=("tiny",),
            seeds=(0,),
            runs=2,
            checkpoints=(1, 2),
            note="CI: a few seconds of training; checks the pipeline, not the science",
        ),
        Preset(
            "default",
            settings=("symmetric40", "pair40", "correlated40", "symmetric20", "symmetric60", "clean"),
            sizes=("full", "half"),
            seeds=(0, 1, 2),
            runs=12,
            tv_only=tuple(
                (s, z)
                for s in ("pair40", "correlated40", "symmetric20", "symmetric60", "clean")
                for z in ("full", "half")
            ),
            note="≈1 h on two idle CPU cores: the 40 % settings of all three noise kinds, symmetric "
            "noise at 0/20/60 %, both sizes, 3 seeds; the no-validation (pool) arm at symmetric 40 %",
        ),
        Preset(
            "extended",
            settings=("pair40", "correlated40", "pair20", "correlated20", "pair60", "correlated60"),
            sizes=("full", "half"),
            seeds=(0, 1, 2),
            runs=12,
            arms=("tv",),
            arms_by_setting=(("pair40", ("pool",)), ("correlated40", ("pool",))),
            note="with the default preset, completes the issue's grid: the no-validation (pool) arm "
            "under pair and correlated 40 % noise (their tv arms are in default), and pair and "
            "correlated noise at 20 % and 60 % (tv arm); ≈40 min on two idle cores",
        ),
        Preset(
            "headline",
            settings=("symmetric40",),
            sizes=("full", "half"),
            seeds=(0, 1, 2),
            runs=12,
            note="the symmetric-40 % part of the default preset (the KEY lines), ≈20 min",
        ),
        Preset(
            "fashion",
            settings=tuple(f"{kind}{rate}" for rate in (40, 20, 60) for kind in ("symmetric", "pair", "correlated")),
            sizes=("f500", "f2000"),
            seeds=(0, 1, 2),
            runs=6,
            checkpoints=(2, 4, 6, 8, 10),
            tv_only=tuple((f"{kind}40", "f2000") for kind in ("symmetric", "pair", "correlated"))
            + tuple((f"{kind}{rate}", "f500") for rate in (20, 60) for kind in ("symmetric", "pair", "correlated")),
            skip=tuple((f"{kind}{rate}", "f2000") for rate in (20, 60) for kind in ("symmetric", "pair", "correlated")),
            base=FASHION,
            note="Fashion-MNIST 5–9 from test_resnet pretrained on 0–4, F estimated (reveal=false), 3 seeds, 6 "
            "configs × 5 checkpoints per search: the three noise kinds at 40 % (validation arm at train 500 and "
            "2,000, no-split arm at 500) and at 20 / 60 % (validation arm at 500); ≈3 h on two cores. Cut to fit: "
            "the no-split arm at 2,000, 20 / 60 % at 2,000, and half the digits study's 12 configs per search",
        ),
        Preset(
            "full",
            settings=(
                "clean",
                *(f"{kind}{rate}" for kind in ("symmetric", "pair", "correlated") for rate in (20, 40, 60)),
            ),
            sizes=("full", "half"),
            seeds=(0, 1, 2, 3, 4),
            runs=12,
            note="every setting of the issue, both arms, 5 seeds: several hours on two cores",
        ),
    )
}


def sample_config(seed: int, run: int) -> dict[str, Any]:
    """The run's hyperparameters (dotted RunConfig keys), a function of (seed, run) alone.

    lr log-uniform [1e-4, 3e-3] (Adam); the REGSL distance constraint with p = 0.5 (D log-uniform
    [0.05, 5], γ uniform [1, 2], head radius log-uniform [1, 25]); NSO with p = 0.3 (σ log-uniform
    [0.003, 0.03], k = 1, constant σ); self-labeling with p = 0.25 (p_thr [0.7, 0.99], τ0
    [0.5, 3], E_r and E_c uniform in 1..16). Ranges as in the ``full`` search space.
    """
    rng = np.random.default_rng([seed, run, 20260611])

    def log_uniform(lo: float, hi: float) -> float:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    cfg: dict[str, Any] = {"optim.lr": log_uniform(1e-4, 3e-3)}
    constraint = bool(rng.random() < 0.5)
    radius, growth, head = log_uniform(0.05, 5.0), float(rng.uniform(1.0, 2.0)), log_uniform(1.0, 25.0)
    nso = bool(rng.random() < 0.3)
    sigma = log_uniform(0.003, 0.03)
    self_label = bool(rng.random() < 0.25)
    threshold, temperature = float(rng.uniform(0.7, 0.99)), float(rng.uniform(0.5, 3.0))
    reweight, correct = int(rng.integers(1, 17)), int(rng.integers(1, 17))
    cfg["constraint.enabled"] = constraint
    if constraint:
        cfg.update({"constraint.radius": radius, "constraint.growth": growth, "constraint.head_radius": head})
    cfg["nso.enabled"] = nso
    if nso:
        cfg.update({"nso.sigma": sigma, "nso.k": 1, "nso.schedule": "constant"})
    cfg["self_label.enabled"] = self_label
    if self_label:
        cfg.update(
            {
                "self_label.threshold": threshold,
                "self_label.temperature": temperature,
                "self_label.reweight_start": reweight,
                "self_label.correct_start": correct,
            }
        )
    return cfg


def method_name(cfg: dict[str, Any]) -> str:
    parts = [
        name
        for name, key in (("regsl", "constraint.enabled"), ("nso", "nso.enabled"), ("sl", "self_label.enabled"))
        if cfg.get(key)
    ]
    return "+".join(parts) or "plain"


@dataclass(frozen=True)
class Job:
    """One training run: a config trained once, recorded at each checkpoint."""

    setting: str
    size: str
    seed: int
    arm: str
    run: int
    checkpoints: tuple[int, ...]
    extra: tuple[tuple[str, Any], ...] = ()  # dotted overrides applied last (Preset.base, size_overrides)

    @property
    def search(self) -> str:
        return f"{self.setting}-{self.size}-s{self.seed}-{self.arm}"

    @property
    def key(self) -> str:
        return f"{self.search}-r{self.run}"

    def overrides(self) -> dict[str, Any]:
        """Dotted RunConfig overrides for this run (task, noise, arm, seed, sampled config)."""
        noise = Setting.parse(self.setting)
        flat: dict[str, Any] = {
            "task.name": "digits",
            "task.noise.kind": noise.kind,
            "task.noise.rate": noise.rate,
            "task.split_seed": self.seed,
            "task.merge_val": self.arm == "pool",
            **SIZES[self.size],
            "epochs": max(self.checkpoints),
            "seed": 1000 * self.seed + self.run,
            "threads": 1,
            "device": "cpu",
            "measure.enabled": False,  # the study measures at every checkpoint itself (runner.py)
            "optim.schedule": "none",
        }
        flat.update(sample_config(self.seed, self.run))
        flat.update(dict(self.extra))
        return flat


def jobs(preset: Preset) -> list[Job]:
    """Every run of the preset: settings in preset order (the headline setting finishes first), the
    validation arm before the no-split arm, longest-expected run first (better packing on two workers)."""
    out = []
    for setting in preset.settings:
        for size in preset.sizes:
            if (setting, size) in preset.skip:
                continue
            arms = dict(preset.arms_by_setting).get(setting, preset.arms)
            arms = ("tv",) if (setting, size) in preset.tv_only else arms
            extra = preset.base + dict(preset.size_overrides).get(size, ())
            for seed in preset.seeds:
                for arm in arms:
                    out += [Job(setting, size, seed, arm, run, preset.checkpoints, extra) for run in range(preset.runs)]
    weight = {"full": 2.0, "half": 1.0, "tiny": 0.1, "f500": 1.0, "f2000": 3.0}

    def cost(job: Job) -> float:
        nso = sample_config(job.seed, job.run)["nso.enabled"]
        return weight[job.size] * (1.4 if job.arm == "pool" else 1.0) * (1.9 if nso else 1.0)

    order = {s: i for i, s in enumerate(preset.settings)}
    return sorted(out, key=lambda job: (order[job.setting], job.arm == "pool", -cost(job)))
