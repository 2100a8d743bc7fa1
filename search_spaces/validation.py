"""Check, before any trial, that the trials of a space build valid RunConfigs.

RunConfig's own validators are the judge, in three passes that each blame the right thing:

1. every combination of categorical values (numbers at the base config's values): a failure
   blames the choices, e.g. NSO and SAM both on;
2. each range at both ends, with the switches it depends on turned on and other numbers at the
   base's values: a failure blames that parameter (the validators are interval checks, so a
   range accepted at both ends is accepted inside);
3. every combination again with all ranges at their low ends, then at their high ends: catches
   rules that tie numbers together (e.g. task.val_fraction + task.test_fraction < 1).

Combinations are enumerated in order and capped at :data:`MAX_COMBINATIONS`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any

from search_spaces.errors import SpaceError
from search_spaces.params import Choice, FloatRange, IntRange, Param
from trainables.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from search_spaces.space import SearchSpace

__all__ = ["GROUP_SCALE_PREFIX", "MAX_COMBINATIONS", "check_space"]

GROUP_SCALE_PREFIX = "constraint.group_scale_"
MAX_COMBINATIONS = 256
"""Combinations of categorical values built per pass; beyond it only the first ones, in order."""


def check_space(space: SearchSpace, base: RunConfig) -> None:
    """Raise :class:`SpaceError` naming the key, value and fix for the first invalid trial."""
    _build(space, base, {}, lambda exc: f"{space.source}: fixed: {exc}; fix that value under fixed:")
    epochs = space.epochs_for(base)
    for param in space.params:
        _check_int_range(space, param, epochs)
        _check_float_on_int_field(space, param)
    for combo in _combinations(space.params, epochs, end=None):
        _check_combination(space, base, combo, "")
    for param in (p for p in space.params if not isinstance(p.dist, Choice)):
        for value in param.dist.ends(epochs=epochs):
            _check_end(space, base, param, value, epochs)
    for end, label in ((0, "low"), (-1, "high")):
        for combo in _combinations(space.params, epochs, end=end):
            _check_combination(space, base, combo, f" with every range at its {label} end")


def _check_int_range(space: SearchSpace, param: Param, epochs: int) -> None:
    if isinstance(param.dist, IntRange):
        low, high = param.dist.resolve(epochs=epochs)
        if low > high:
            raise SpaceError.at(
                space.source,
                f"params.{param.key}",
                [param.dist.low, param.dist.high],
                f"with epochs = {epochs} the range [{low}, {high}] is empty",
                "lower the bound or run more epochs",
            )


def _check_float_on_int_field(space: SearchSpace, param: Param) -> None:
    """Ends alone cannot catch this one: 1.0 and 5.0 pass an integer field, 2.5 does not."""
    if isinstance(param.dist, FloatRange) and _field_type(param.key) is int:
        raise SpaceError.at(
            space.source,
            f"params.{param.key}",
            {"float": [param.dist.low, param.dist.high]},
            "a float range on an integer field samples non-integers",
            f"write int: [{int(param.dist.low)}, {int(param.dist.high)}]",
        )


def _field_type(key: str) -> Any:
    """The declared type of a dotted RunConfig key, ``X | None`` unwrapped."""
    if key.startswith(GROUP_SCALE_PREFIX):
        return float
    tp: Any = RunConfig
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None  # not a RunConfig key: building the config reports it
        tp = hints[part]
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    return options[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def _check_end(space: SearchSpace, base: RunConfig, param: Param, value: Any, epochs: int) -> None:
    sampled = _isolated(space, param, value, epochs)
    if param.key not in sampled:
        raise SpaceError.at(
            space.source,
            f"params.{param.key}.when",
            dict(param.when),
            "the conditions contradict each other: the parameter can never be sampled",
            "fix the when: conditions along its chain",
        )

    def message(exc: ConfigError) -> str:
        problem = f"the run config rejects it ({exc})"
        return str(SpaceError.at(space.source, f"params.{param.key}", value, problem, "narrow the range"))

    _build(space, base, sampled, message)


def _check_combination(space: SearchSpace, base: RunConfig, combo: dict[str, Any], how: str) -> None:
    choices = {p.key: combo[p.key] for p in space.params if p.key in combo and isinstance(p.dist, Choice)}
    _build(
        space,
        base,
        combo,
        lambda exc: (
            f"{space.source}: params: the choices {choices}{how} build no valid run config ({exc}); "
            "add a when: condition so these choices cannot meet, or narrow the ranges"
        ),
    )


def _build(
    space: SearchSpace, base: RunConfig, sampled: Mapping[str, Any], message: Callable[[ConfigError], str]
) -> None:
    try:
        RunConfig.from_flat({**space.fixed, **sampled}, base=base)
    except ConfigError as exc:
        raise SpaceError(message(exc)) from None


def _switches(space: SearchSpace, param: Param) -> dict[str, Any]:
    """The categorical values ``param`` needs, following its conditions' own conditions."""
    by_key = {p.key: p for p in space.params}
    forced: dict[str, Any] = {}
    for key, value in param.when.items():
        forced.update(_switches(space, by_key[key]))
        forced[key] = value
    return forced


def _isolated(space: SearchSpace, param: Param, value: Any, epochs: int) -> dict[str, Any]:
    """A trial with ``param = value`` and its switches on; other numbers keep the base's values.

    Free group scales travel together (RunConfig needs scales 0..G-1), the others at their low ends.
    """
    forced = {**_switches(space, param), param.key: value}
    grouped = param.key.startswith(GROUP_SCALE_PREFIX)
    sampled: dict[str, Any] = {}
    for p in space.params:
        if not p.active(sampled):
            continue
        if p.key in forced:
            sampled[p.key] = forced[p.key]
        elif isinstance(p.dist, Choice) or (grouped and p.key.startswith(GROUP_SCALE_PREFIX)):
            sampled[p.key] = p.dist.ends(epochs=epochs)[0]
    return sampled


def _combinations(params: tuple[Param, ...], epochs: int, *, end: int | None) -> Iterator[dict[str, Any]]:
    """Reachable assignments of categorical values, in order, capped at MAX_COMBINATIONS.

    Numbers take their ``end`` (0: low, -1: high) or, with ``end=None``, the base's values.
    """
    return islice(_assign(params, epochs, end, 0, {}), MAX_COMBINATIONS)


def _assign(
    params: tuple[Param, ...], epochs: int, end: int | None, i: int, sampled: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    if i == len(params):
        yield sampled
        return
    param, rest = params[i], i + 1
    ends = param.dist.ends(epochs=epochs)
    if isinstance(param.dist, Choice) and param.active(sampled):
        values: tuple[Any, ...] = ends
    elif end is not None and param.active(sampled):
        values = (ends[end],)
    else:
        yield from _assign(params, epochs, end, rest, sampled)
        return
    for value in values:
        yield from _assign(params, epochs, end, rest, {**sampled, param.key: value})
