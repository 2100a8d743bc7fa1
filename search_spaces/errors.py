"""The one exception type of :mod:`search_spaces`."""

from __future__ import annotations

from typing import Any

from trainables.errors import HesstuneError

__all__ = ["SpaceError"]


class SpaceError(HesstuneError):
    """A search space is invalid; the message names the file, the key, the value and the fix."""

    @classmethod
    def at(cls, source: str, key: str, value: Any, problem: str, fix: str) -> SpaceError:
        """The error for one entry: ``<file>: <key> = <value>: <problem>; <fix>``."""
        return cls(f"{source}: {key} = {value!r}: {problem}; {fix}")
