"""The README's Python API example runs as written: a sweep, selection, export, predictions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "sweep_to_predictions.py"


def test_sweep_to_predictions_example(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--output", str(tmp_path / "out"), "--trials", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert (tmp_path / "out" / "best" / "1.safetensors").is_file()
    files = re.search(r"accuracy on (\d+) image files: ([0-9.]+)", proc.stdout)
    logged = re.search(r"test_acc the trial logged: +([0-9.]+)", proc.stdout)
    assert files and logged, proc.stdout[-2000:]
    n, on_files = int(files[1]), float(files[2])
    assert n > 100 and len(list((tmp_path / "out" / "images").glob("*.png"))) == n
    assert abs(on_files - float(logged[1])) <= 3 / n  # 8-bit files: at most a few borderline images flip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing outside --output
