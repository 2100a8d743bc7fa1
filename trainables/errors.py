"""The base of every error hesstune raises for input a user can fix.

Each project error (bad config, search space, command line, data, tracking store, cluster,
selection request) subclasses :class:`HesstuneError`; its message names the value and the fix.
The CLI turns exactly these into one-line errors with exit status 2, so an internal bug, which
raises anything else, still shows its traceback. It subclasses ``ValueError`` so that callers
catching ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["HesstuneError"]


class HesstuneError(ValueError):
    """Input a user can fix; the message says what and how."""
