"""The code checks run with the tests: ruff (lint and format) and mypy must be clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ruff_is_clean() -> None:
    proc = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_ruff_format_is_clean() -> None:
    proc = subprocess.run(
        [str(BIN / "ruff"), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    proc = subprocess.run([str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_no_ray_train_report_in_the_package() -> None:
    """Inside Tune trainables Ray 2.60 raises on ray.train.report; only ray.tune.* is allowed."""
    forbidden = re.compile(r"ray\.train\.\w+\(|from ray\.train\b|import ray\.train\b|from ray import train\b")
    offenders = [
        str(p)
        for pkg in ("trainables", "tuning")
        for p in (ROOT / pkg).rglob("*.py")
        if forbidden.search(p.read_text())
    ]
    assert offenders == []


def test_code_and_docs_point_only_into_the_repository() -> None:
    """Design notes live in docs/: no comment or page cites a file the repository does not carry."""
    outside = re.compile(r"SPEC §|\bSPEC\b|research/|feasibility|STYLE\.md|papers\.md|system\.md|hessian\.md")
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.yaml", "*.toml"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = [
        f"{name}:{i}: {line.strip()}"
        for name in files
        if (ROOT / name).is_file() and name != "tests/test_lint.py"
        for i, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not offenders, "\n".join(offenders[:20])


def test_benchmarks_use_only_public_names_of_the_package() -> None:
    """Benchmarks time what users run, through the public API: no ``_private`` module or name of
    ``trainables`` or ``tuning`` is imported (they may change without notice)."""
    import ast

    found = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module.split(".")[0] not in ("trainables", "tuning"):
                continue
            private = [p for p in node.module.split(".") if p.startswith("_")]
            private += [alias.name for alias in node.names if alias.name.startswith("_")]
            if private:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} {private}")
    assert not found, "\n".join(found)
