"""Read a search space from a preset name or a YAML file, strictly (schema: ``search_spaces``)."""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Hashable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from search_spaces.errors import SpaceError
from search_spaces.params import EPOCHS, Choice, IntRange, Param, parse_param, same_value
from search_spaces.space import SearchSpace
from search_spaces.validation import GROUP_SCALE_PREFIX
from trainables.config import RunConfig

__all__ = ["list_presets", "load_space", "parse_space"]

_TOP_LEVEL = ("description", "fixed", "params")
_GROUP_SCALE = re.compile(re.escape(GROUP_SCALE_PREFIX) + r"(0|[1-9][0-9]*)")


def list_presets() -> list[str]:
    """Names of the built-in presets (the YAML files shipped in ``search_spaces/presets``)."""
    folder = resources.files("search_spaces") / "presets"
    return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))


def load_space(name_or_path: str | os.PathLike[str]) -> SearchSpace:
    """Load and validate a preset by name, or a user file (``*.yaml``/``*.yml`` or any path).

    Validation covers the schema and a check that the space's trials build valid RunConfigs on
    the default RunConfig; :meth:`SearchSpace.bind` repeats the check on the sweep's base.
    """
    text, name, source = _read(name_or_path)
    space = parse_space(_parse_yaml(text, source), name=name, source=source)
    space.check(RunConfig())
    return space


def parse_space(data: Any, *, name: str, source: str) -> SearchSpace:
    """Build a :class:`SearchSpace` from parsed YAML; schema errors raise :class:`SpaceError`."""
    if not isinstance(data, dict):
        raise SpaceError.at(
            source,
            "the file",
            data,
            "a search space must be a mapping",
            "write description:, fixed: and params: sections",
        )
    unknown = sorted(set(data) - set(_TOP_LEVEL), key=str)
    if unknown:
        raise SpaceError.at(
            source,
            str(unknown[0]),
            data[unknown[0]],
            "unknown top-level key",
            f"allowed keys: {', '.join(_TOP_LEVEL)}",
        )
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise SpaceError.at(source, "description", description, "must be a string", "write one line of text")
    fixed = _fixed(data.get("fixed") or {}, source)
    params = _params(data.get("params"), source)
    _check_overlap(fixed, params, source)
    return SearchSpace(name=name, description=description.strip(), fixed=fixed, params=params, source=source)


# -- files -------------------------------------------------------------------------------------
def _read(name_or_path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(text, name, source) of a preset or a user file."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise SpaceError(
                f"search space file {text!r} does not exist: check the path, or use a preset "
                f"({', '.join(list_presets())})"
            )
        return path.read_text(), path.stem, str(path)
    if text not in list_presets():
        raise SpaceError(
            f"unknown search space {text!r}: use a preset ({', '.join(list_presets())}) or the path of a .yaml file"
        )
    preset = resources.files("search_spaces") / "presets" / f"{text}.yaml"
    return preset.read_text(), text, f"preset {text} ({preset})"


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise SpaceError(f"{source}: not valid YAML ({exc}); fix the syntax at the line shown") from None


# -- sections ----------------------------------------------------------------------------------
@functools.cache
def _flat_keys() -> tuple[str, ...]:
    return tuple(RunConfig().to_flat())


def _check_key(key: Any, section: str, source: str) -> str:
    if isinstance(key, str) and (key in _flat_keys() or _GROUP_SCALE.fullmatch(key)):
        return key
    close = difflib.get_close_matches(str(key), _flat_keys(), n=3)
    fix = (
        f"did you mean {' or '.join(close)}?"
        if close
        else (f"use a dotted RunConfig key (RunConfig().to_flat(), e.g. optim.lr) or {GROUP_SCALE_PREFIX}<g>")
    )
    raise SpaceError.at(source, f"{section}.{key}", key, "not a run config key", fix)


def _fixed(fixed: Any, source: str) -> dict[str, Any]:
    if not isinstance(fixed, dict):
        raise SpaceError.at(
            source, "fixed", fixed, "must be a mapping", "write dotted keys: fixed: {nso.enabled: true}"
        )
    return {_check_key(key, "fixed", source): value for key, value in fixed.items()}


def _params(params: Any, source: str) -> tuple[Param, ...]:
    if not isinstance(params, dict) or not params:
        raise SpaceError.at(
            source,
            "params",
            params,
            "a space needs at least one searched parameter",
            "add params: {optim.lr: {float: [1.0e-4, 1.0e-2], log: true}}",
        )
    parsed: list[Param] = []
    for key, spec in params.items():
        param = parse_param(_check_key(key, "params", source), spec, source=source)
        _check_when(param, parsed, source)
        parsed.append(param)
    return tuple(parsed)


def _check_when(param: Param, earlier: list[Param], source: str) -> None:
    """Each condition names an earlier categorical parameter and one of its choices."""
    by_key = {p.key: p for p in earlier}
    for key, value in param.when.items():
        where = f"params.{param.key}.when.{key}"
        switch = by_key.get(key)
        if switch is None or not isinstance(switch.dist, Choice):
            raise SpaceError.at(
                source,
                where,
                value,
                f"{key} is not an earlier categorical parameter",
                "condition on a categorical parameter listed above this one",
            )
        if not any(same_value(value, c) for c in switch.dist.choices):
            raise SpaceError.at(
                source,
                where,
                value,
                f"not among the choices of {key}",
                f"use one of {list(switch.dist.choices)}",
            )


def _check_overlap(fixed: dict[str, Any], params: tuple[Param, ...], source: str) -> None:
    keys = {p.key for p in params}
    both = sorted(keys & set(fixed))
    if both:
        raise SpaceError.at(
            source,
            f"fixed.{both[0]}",
            fixed[both[0]],
            "also a searched parameter",
            "keep it under fixed: or under params:, not both",
        )
    symbolic = [p.key for p in params if isinstance(p.dist, IntRange) and EPOCHS in (p.dist.low, p.dist.high)]
    if EPOCHS in keys and symbolic:
        raise SpaceError.at(
            source,
            f"params.{symbolic[0]}",
            EPOCHS,
            "epochs is searched, so the bound is ambiguous",
            "fix epochs under fixed: or use numeric bounds",
        )
    scales = any(k.startswith(GROUP_SCALE_PREFIX) for k in keys | set(fixed))
    if scales and "constraint.group_scales" in fixed:
        raise SpaceError.at(
            source,
            "fixed.constraint.group_scales",
            fixed["constraint.group_scales"],
            f"conflicts with {GROUP_SCALE_PREFIX}<g> keys",
            f"give the scales either as a list or as {GROUP_SCALE_PREFIX}<g> keys",
        )
