"""One searched parameter: a distribution, an optional condition, and its parser.

A parameter is data. ``suggest`` is the only place that talks to Optuna, and it only calls
``trial.suggest_float``/``suggest_int``/``suggest_categorical`` with the parameter's dotted
RunConfig key as the name, so the same code works with ``optuna.Trial``, ``FixedTrial`` and the
suggest-capturing proxy Ray's ``OptunaSearch`` wraps around a trial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from optuna.trial import BaseTrial

from search_spaces.errors import SpaceError

__all__ = ["EPOCHS", "Choice", "Distribution", "FloatRange", "IntRange", "Param", "parse_param", "same_value"]

EPOCHS = "epochs"
"""Symbolic int bound: resolves to the run's epochs (``fixed: {epochs: …}``, else the base config's)."""

IntBound = int | Literal["epochs"]
_SCALAR_TYPES = (bool, int, float, str, type(None))
_OPTIONS = {"float": ("log", "when"), "int": ("log", "when"), "categorical": ("when",)}


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type: ``True`` is not ``1`` and ``1`` is not ``1.0`` in a condition."""
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class FloatRange:
    """A float in ``[low, high]``, uniform or log-uniform."""

    low: float
    high: float
    log: bool = False

    def suggest(self, trial: BaseTrial, name: str, *, epochs: int) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def ends(self, *, epochs: int) -> tuple[float, ...]:
        """The values load-time validation builds a RunConfig with: both ends."""
        return (self.low, self.high)

    def contains(self, value: Any, *, epochs: int) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class IntRange:
    """An integer in ``[low, high]``; a bound may be the symbol ``epochs``."""

    low: IntBound
    high: IntBound
    log: bool = False

    def resolve(self, *, epochs: int) -> tuple[int, int]:
        """The numeric bounds for a run of ``epochs`` epochs."""
        return (
            epochs if self.low == EPOCHS else int(self.low),
            epochs if self.high == EPOCHS else int(self.high),
        )

    def suggest(self, trial: BaseTrial, name: str, *, epochs: int) -> int:
        low, high = self.resolve(epochs=epochs)
        return trial.suggest_int(name, low, high, log=self.log)

    def ends(self, *, epochs: int) -> tuple[int, ...]:
        return self.resolve(epochs=epochs)

    def contains(self, value: Any, *, epochs: int) -> bool:
        low, high = self.resolve(epochs=epochs)
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class Choice:
    """One of a list of YAML scalars (bool, int, float, str or null)."""

    choices: tuple[Any, ...]

    def suggest(self, trial: BaseTrial, name: str, *, epochs: int) -> Any:
        return trial.suggest_categorical(name, self.choices)

    def ends(self, *, epochs: int) -> tuple[Any, ...]:
        return self.choices

    def contains(self, value: Any, *, epochs: int) -> bool:
        return any(same_value(value, c) for c in self.choices)


Distribution = FloatRange | IntRange | Choice


@dataclass(frozen=True)
class Param:
    """A dotted RunConfig key, its distribution, and the switch values it is sampled under."""

    key: str
    dist: Distribution
    when: Mapping[str, Any] = field(default_factory=dict)

    def active(self, sampled: Mapping[str, Any]) -> bool:
        """True when every condition holds among the values sampled so far."""
        return all(k in sampled and same_value(sampled[k], v) for k, v in self.when.items())


# -- parsing -----------------------------------------------------------------------------------
def parse_param(key: str, spec: Any, *, source: str) -> Param:
    """Parse one ``params`` entry, e.g. ``{float: [0.03, 20], log: true, when: {x: true}}``.

    Checks the entry on its own; whether ``when`` names an earlier categorical parameter is
    checked by the space, which knows the order.
    """
    where = f"params.{key}"
    if not isinstance(spec, dict):
        raise SpaceError.at(source, where, spec, "a parameter must be a mapping", "write e.g. {float: [0.001, 0.1]}")
    kind = _kind(spec, where, source)
    unknown = sorted(set(spec) - {kind, *_OPTIONS[kind]}, key=str)
    if unknown:
        allowed = ", ".join(_OPTIONS[kind])
        raise SpaceError.at(source, where, spec, f"unknown option {unknown[0]!r}", f"{kind} allows: {allowed}")
    log = _log(spec, where, source)
    dist: Distribution
    if kind == "float":
        dist = _float_range(spec[kind], log, where, source)
    elif kind == "int":
        dist = _int_range(spec[kind], log, where, source)
    else:
        dist = _choice(spec[kind], where, source)
    return Param(key, dist, _when(spec.get("when", {}), where, source))


def _kind(spec: dict[Any, Any], where: str, source: str) -> str:
    kinds = [k for k in _OPTIONS if k in spec]
    if len(kinds) != 1:
        problem = "no distribution kind" if not kinds else f"two distribution kinds ({', '.join(kinds)})"
        raise SpaceError.at(
            source,
            where,
            spec,
            problem,
            "give exactly one of float: [lo, hi], int: [lo, hi], categorical: [a, b, …]",
        )
    return kinds[0]


def _log(spec: dict[Any, Any], where: str, source: str) -> bool:
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError.at(source, f"{where}.log", log, "log must be a boolean", "write log: true or leave it out")
    return log


def _pair(bounds: Any, where: str, source: str) -> tuple[Any, Any]:
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise SpaceError.at(source, where, bounds, "bounds must be a list of two values", "write [low, high]")
    return bounds[0], bounds[1]


def _float_range(bounds: Any, log: bool, where: str, source: str) -> FloatRange:
    low, high = _pair(bounds, where, source)
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            hint = " (PyYAML reads 1e-4 as a string: write 1.0e-4)" if isinstance(value, str) else ""
            raise SpaceError.at(source, where, value, "float bounds must be finite numbers", f"use a number{hint}")
    _ordered(low, high, where, source)
    if log and low <= 0:
        raise SpaceError.at(source, where, bounds, "a log range needs low > 0", "raise low or drop log: true")
    return FloatRange(float(low), float(high), log)


def _int_range(bounds: Any, log: bool, where: str, source: str) -> IntRange:
    low, high = _pair(bounds, where, source)
    for value in (low, high):
        if value != EPOCHS and (isinstance(value, bool) or not isinstance(value, int)):
            raise SpaceError.at(
                source,
                where,
                value,
                "int bounds must be integers or 'epochs'",
                "write e.g. [1, epochs] or [2, 8]",
            )
    if low == EPOCHS and high == EPOCHS:
        raise SpaceError.at(source, where, bounds, "the range holds a single value", "fix the value instead")
    if low != EPOCHS and high != EPOCHS:
        _ordered(low, high, where, source)
    if log and low != EPOCHS and low < 1:
        raise SpaceError.at(source, where, bounds, "a log int range needs low ≥ 1", "raise low or drop log: true")
    return IntRange(low, high, log)


def _ordered(low: float, high: float, where: str, source: str) -> None:
    if low >= high:
        raise SpaceError.at(
            source,
            where,
            [low, high],
            "low ≥ high",
            "write [low, high] with low < high (put a single value under fixed:)",
        )


def _choice(values: Any, where: str, source: str) -> Choice:
    if not isinstance(values, list) or not values:
        raise SpaceError.at(
            source,
            where,
            values,
            "categorical needs a non-empty list",
            "write e.g. categorical: [true, false]",
        )
    for i, value in enumerate(values):
        if not isinstance(value, _SCALAR_TYPES):
            raise SpaceError.at(source, where, value, "choices must be scalars", "use bool, number, string or null")
        if any(same_value(value, other) for other in values[:i]):
            raise SpaceError.at(source, where, values, f"choice {value!r} appears twice", "list each choice once")
    return Choice(tuple(values))


def _when(when: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(when, dict) or not all(isinstance(k, str) for k in when):
        raise SpaceError.at(
            source,
            f"{where}.when",
            when,
            "when must map parameter keys to values",
            "write e.g. when: {nso.enabled: true}",
        )
    return dict(when)
