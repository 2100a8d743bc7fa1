"""One typed configuration for a fine-tuning run.

Every entry point (``hesstune train``, the Ray trainable, exported config files) uses
:class:`RunConfig`. Nested dicts (YAML) and flat dotted dicts (the Ray/Optuna boundary) are
converted once, with strict validation: unknown keys and out-of-range values raise
:class:`ConfigError` with a message that names the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from trainables.errors import HesstuneError

__all__ = [
    "ConfigError",
    "ConsistentConfig",
    "ConstraintConfig",
    "MeasureConfig",
    "ModelConfig",
    "NSOConfig",
    "NoiseConfig",
    "OptimConfig",
    "RunConfig",
    "SAMConfig",
    "SelfLabelConfig",
    "TaskConfig",
    "load_config",
]


class ConfigError(HesstuneError):
    """A configuration value is invalid; the message names the value and how to fix it."""


# keys earlier versions exported that no longer mean anything: ``consistent.estimate_epochs``
# (F is now estimated once per run by trainables.transition, not by training a plain model)
RETIRED_KEYS = {"consistent": ("estimate_epochs",)}


@dataclass(frozen=True)
class NoiseConfig:
    """Synthetic label noise injected into the training (and by default validation) labels."""

    kind: Literal["none", "symmetric", "pair", "correlated"] = "symmetric"
    rate: float = 0.4
    noisy_val: bool = True
    # false: act as a user would, who never knows F: everything that needs the noise matrix uses
    # the estimate from the data (trainables.transition), even for noise hesstune injected itself
    reveal: bool = True
    estimator: Literal["anchor", "dual_t", "confident"] = "confident"  # how F is estimated (docs/transition.md)

    def validate(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ConfigError(f"task.noise.rate={self.rate} is outside [0, 1): use a rate such as 0.4")
        if self.kind == "none" and self.rate:
            raise ConfigError(f"task.noise.kind='none' with task.noise.rate={self.rate}: set rate to 0 or pick a kind")


@dataclass(frozen=True)
class TaskConfig:
    """Which data set, how it is split, and how large the images are."""

    name: str = "digits"  # digits | fashion-mnist[:PATH] | mnist:PATH | imagefolder:PATH | cifar10:PATH | cifar100:PATH
    val_fraction: float = 0.2
    test_fraction: float = 0.3  # of the pool, for tasks without a fixed test set
    train_size: int | None = None  # keep only this many training samples (data-size studies)
    val_size: int | None = None  # this many validation samples instead of val_fraction of the pool
    # classes that pretrain the ``source`` model, and the classes fine-tuned on (relabelled 0..T−1
    # in this order); null: the task's default (digits, mnist, fashion-mnist: 0–4 and 5–9; else
    # no source and every class as target)
    source_classes: tuple[int, ...] | None = None
    target_classes: tuple[int, ...] | None = None
    image_size: int = 32
    split_seed: int = 0  # split and noise draw; independent of the training seed
    merge_val: bool = False  # final fit: train on train ∪ val, no validation split
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    def validate(self) -> None:
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"task.{key}={value} is outside [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("task.val_fraction + task.test_fraction must be < 1 to leave training data")
        if self.train_size is not None and self.train_size < 1:
            raise ConfigError(f"task.train_size={self.train_size} must be ≥ 1 (or null for all)")
        if self.val_size is not None and self.val_size < 0:
            raise ConfigError(f"task.val_size={self.val_size} must be ≥ 0 (or null for task.val_fraction)")
        self._validate_classes()
        if self.image_size < 8:
            raise ConfigError(f"task.image_size={self.image_size} must be ≥ 8")
        self.noise.validate()

    def _validate_classes(self) -> None:
        for key in ("source_classes", "target_classes"):
            classes = getattr(self, key) or ()
            if any(c < 0 for c in classes) or len(set(classes)) != len(classes):
                raise ConfigError(f"task.{key}={list(classes)} must list distinct class indices ≥ 0")
        both = sorted(set(self.source_classes or ()) & set(self.target_classes or ()))
        if both:
            raise ConfigError(
                f"class {both[0]} is in both task.source_classes and task.target_classes: "
                "pretraining on a target class would leak it; list each class in one of them"
            )


@dataclass(frozen=True)
class ModelConfig:
    """A timm architecture and where its starting weights come from.

    ``pretrained``: ``source`` (pretrained once on the task's source classes, cached),
    ``timm`` (timm/Hugging Face cache, no download), ``none`` (random init, the from-scratch
    baseline), or ``file:PATH`` (a safetensors or weights-only torch file).
    """

    name: str = "test_resnet"
    pretrained: str = "source"

    def validate(self) -> None:
        if self.pretrained not in ("source", "timm", "none") and not self.pretrained.startswith("file:"):
            raise ConfigError(f"model.pretrained={self.pretrained!r} is unknown: use source, timm, none or file:PATH")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    head_lr_mult: float = 1.0  # the new head's lr = lr × this (a fresh head often wants a larger step)
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 32
    schedule: Literal["none", "step", "cosine"] = "none"
    step_size: int = 10
    gamma: float = 0.1

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if not self.head_lr_mult > 0:
            raise ConfigError(f"optim.head_lr_mult={self.head_lr_mult} must be > 0 (1: the body's lr)")
        if self.batch_size < 1:
            raise ConfigError(f"optim.batch_size={self.batch_size} must be ≥ 1")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be ≥ 0")


@dataclass(frozen=True)
class ConstraintConfig:
    """Layer-wise distance constraint (REGSL, Li & Zhang 2021).

    Radius of depth group g: ``radius * growth**g``, or ``radius * group_scales[g]`` when free
    per-group scales are given. The head has its own radius.
    """

    enabled: bool = False
    mode: Literal["projection", "penalty"] = "projection"
    radius: float = 1.0
    growth: float = 1.0
    group_scales: tuple[float, ...] | None = None
    head_radius: float = 10.0
    head_from_zero: bool = False
    penalty: float = 1e-3  # λ of the penalty variant: λ_g ‖W − W0‖² with the same group scales

    def validate(self) -> None:
        if self.radius <= 0 or self.head_radius <= 0:
            raise ConfigError("constraint.radius and constraint.head_radius must be > 0")
        if self.growth < 1:
            raise ConfigError(f"constraint.growth={self.growth} must be ≥ 1 (deeper layers move further)")
        if self.group_scales is not None and any(s <= 0 for s in self.group_scales):
            raise ConfigError(f"constraint.group_scales={list(self.group_scales)} must all be > 0")
        if self.penalty < 0:
            raise ConfigError(f"constraint.penalty={self.penalty} must be ≥ 0")


@dataclass(frozen=True)
class SelfLabelConfig:
    """Self-labeling (REGSL): label correction and soft down-weighting."""

    enabled: bool = False
    correct_start: int = 10  # E_c, 1-indexed epoch
    threshold: float = 0.9  # p_thr
    reweight_start: int = 5  # E_r
    temperature: float = 1.0  # τ0

    def validate(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"self_label.threshold={self.threshold} must be in (0, 1)")
        if self.temperature <= 0:
            raise ConfigError(f"self_label.temperature={self.temperature} must be > 0")
        if self.correct_start < 1 or self.reweight_start < 1:
            raise ConfigError("self_label.correct_start and reweight_start are 1-indexed epochs (≥ 1)")


@dataclass(frozen=True)
class ConsistentConfig:
    """Consistent (backward-corrected) loss under class-conditional noise.

    ``transition``: ``symmetric`` (rate given, or the task's noise rate when null), ``task`` (the
    run's F: the injected noise's own when ``task.noise.reveal``, else the estimate from the data),
    or ``estimated`` (always the estimate, trainables.transition; the whole run then uses it).
    """

    enabled: bool = False
    transition: Literal["symmetric", "task", "estimated"] = "symmetric"
    rate: float | None = None

    def validate(self) -> None:
        if self.rate is not None and not 0.0 <= self.rate < 1.0:
            raise ConfigError(f"consistent.rate={self.rate} is outside [0, 1)")


@dataclass(frozen=True)
class NSOConfig:
    """Noise stability optimization (two-point weight noise)."""

    enabled: bool = False
    sigma: float = 0.01
    k: int = 1
    lam: float = 0.0
    schedule: Literal["constant", "linear", "exp"] = "constant"
    bn_stats: Literal["pair_mean", "clean_forward", "frozen"] = "pair_mean"

    def validate(self) -> None:
        if not self.sigma > 0:
            raise ConfigError(f"nso.sigma={self.sigma} must be > 0 (e.g. 0.01)")
        if self.k < 1:
            raise ConfigError(f"nso.k={self.k} must be ≥ 1 (number of ± noise pairs per step)")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"nso.lam={self.lam} must be in [0, 1]")


@dataclass(frozen=True)
class SAMConfig:
    """Sharpness-aware minimization (Foret et al.), the sharpness baseline."""

    enabled: bool = False
    rho: float = 0.05

    def validate(self) -> None:
        if not self.rho > 0:
            raise ConfigError(f"sam.rho={self.rho} must be > 0")


@dataclass(frozen=True)
class MeasureConfig:
    """Hessian measures computed on the fine-tuned model at the end of a run (docs/measures.md).

    ``samples``: the measure sample set S is the training set capped at this many samples
    (seeded subset); its realised size is recorded with the result. ``loss_bound``: the
    trial-independent constant C of the bound; null picks log(1/min F) when the noise transition
    matrix F is known, else ``2·log K`` on the truncated loss.
    """

    enabled: bool = True
    samples: int = 2048
    trace: bool = True
    trace_rel_tol: float = 0.05  # stop when the standard error ≤ this × |estimate| …
    trace_max_probes: int = 48  # … or after this many products (cost cap; trace_se is logged)
    eigenvalue: bool = True
    eigen_samples: int = 128
    eigen_iters: int = 15  # Lanczos iterations at most …
    eigen_rel_tol: float = 1e-2  # … fewer once the top Ritz pair's residual ≤ this × λ (0: all; logged)
    loss_bound: float | None = None
    every: int = 0  # also measure every N epochs (0: only at the end)

    def validate(self) -> None:
        if min(self.samples, self.eigen_samples, self.eigen_iters, self.trace_max_probes) < 1:
            raise ConfigError("measure.samples, eigen_samples, eigen_iters and trace_max_probes must be ≥ 1")
        if not 0 < self.trace_rel_tol < 1:
            raise ConfigError(f"measure.trace_rel_tol={self.trace_rel_tol} must be in (0, 1)")
        if not 0 <= self.eigen_rel_tol < 1:
            raise ConfigError(f"measure.eigen_rel_tol={self.eigen_rel_tol} must be in [0, 1) (0: all eigen_iters)")
        if self.loss_bound is not None and not self.loss_bound > 0:
            raise ConfigError(f"measure.loss_bound={self.loss_bound} must be > 0 (or null for auto)")
        if self.every < 0:
            raise ConfigError(f"measure.every={self.every} must be ≥ 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one fine-tuning run."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    self_label: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    consistent: ConsistentConfig = field(default_factory=ConsistentConfig)
    nso: NSOConfig = field(default_factory=NSOConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    # CPU threads for torch (0: torch's default). Part of the config because float reductions
    # depend on it: replaying an exported trial bit-for-bit needs the thread count it ran with.
    threads: int = 0

    def validate(self) -> RunConfig:
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be ≥ 1")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be ≥ 0 (0: torch's default)")
        if self.nso.enabled and self.sam.enabled:
            raise ConfigError("nso and sam both change the gradient: enable one of them, not both")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate()
        return self

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a nested dict (YAML form); unknown keys are errors, except retired keys that
        configs exported by earlier versions still carry (:data:`RETIRED_KEYS`), which are dropped."""
        for name, keys in RETIRED_KEYS.items():
            section = data.get(name)
            if isinstance(section, dict) and any(k in section for k in keys):
                data = {**data, name: {k: v for k, v in section.items() if k not in keys}}
        return _build(cls, data, "").validate()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_flat(self) -> dict[str, Any]:
        """The flat dotted form used at the Ray boundary: ``{"optim.lr": 1e-3, ...}``."""
        return _flatten(self.to_dict())

    @classmethod
    def from_flat(cls, flat: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Apply dotted overrides (e.g. a trial's sampled parameters) on top of ``base``.

        Free per-group constraint scales may come as ``constraint.group_scale_<g>`` keys.
        """
        nested = (base or cls()).to_dict()
        scales: dict[int, float] = {}
        for key, value in flat.items():
            if key.startswith("constraint.group_scale_"):
                scales[_scale_index(key)] = float(value)
                continue
            _set_dotted(nested, key, value)
        if scales:
            if sorted(scales) != list(range(len(scales))):
                raise ConfigError(f"constraint.group_scale_<g> keys must be 0..G-1, got {sorted(scales)}")
            nested["constraint"]["group_scales"] = [scales[g] for g in range(len(scales))]
        return cls.from_dict(nested)

    def replace(self, **flat: Any) -> RunConfig:
        """A copy with dotted overrides, e.g. ``cfg.replace(**{"optim.lr": 3e-4})``."""
        return RunConfig.from_flat(flat, base=self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config (``yaml.safe_load``); missing keys take their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return RunConfig.from_dict(data)


# -- helpers ---------------------------------------------------------------------------------
T = TypeVar("T")


def _build(cls: type[T], data: Any, prefix: str) -> T:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} in {where}: valid keys are {', '.join(names)}")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(options[0], value, key)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(map(str, get_args(tp)))
            raise ConfigError(f"{key}={value!r} is not one of: {choices}")
        return value
    if origin is tuple:
        item = get_args(tp)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list of {'integers' if item is int else 'numbers'}")
        return tuple(_coerce(item, v, key) for v in value)
    return _scalar(tp, value, key)


def _scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config field type {tp} for {key}")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_dotted(nested: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = nested
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown key {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    if parts[-1] not in node:
        section = ".".join(parts[:-1]) or "the config"
        raise ConfigError(f"unknown key {key}: valid keys in {section} are {', '.join(node)}")
    node[parts[-1]] = value


def _scale_index(key: str) -> int:
    suffix = key.removeprefix("constraint.group_scale_")
    if not suffix.isdigit():
        raise ConfigError(f"unknown key {key}: per-group scales are constraint.group_scale_<g>, g = 0, 1, …")
    return int(suffix)
