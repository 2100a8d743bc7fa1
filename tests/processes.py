"""This machine's processes, read from /proc: tests find their own Ray processes by ancestry or by
a folder on their command line, never by patterns that could match another test's Ray."""

from __future__ import annotations

from pathlib import Path


def process_table() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line with NUL separators) of every live process."""
    table: dict[int, tuple[int, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        table[int(entry.name)] = (ppid, cmdline)
    return table


def with_descendants(roots: set[int], table: dict[int, tuple[int, bytes]]) -> set[int]:
    """``roots`` and every process below them."""
    found = set(roots)
    while more := {pid for pid, (ppid, _) in table.items() if ppid in found} - found:
        found |= more
    return found
