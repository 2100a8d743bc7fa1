"""Many writers on one tracking store: two sweeps at once, 4 concurrent trials each (8 in all, on
logical CPUs), logging every epoch to the same sqlite file. A sweep writes from its driver only,
so two sweeps are two writers of one store: the contended case. The same on `hesstune server` is
in tests/test_outage.py (two sweeps, 8 trials, and an outage); benchmarks/many_writers.py
measures both stores at 8 writers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.audit import audit_sweep
from tests.test_cluster import base_env

pytestmark = pytest.mark.slow

TRIALS, EPOCHS = 4, 2


def test_two_sweeps_at_once_on_one_sqlite_store_lose_and_repeat_nothing(tmp_path: Path) -> None:
    """Two sweeps started together in one --output share its sqlite store (which neither has
    created yet: this found a race in MLflow's table creation)."""
    out = tmp_path / "out"
    drivers = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "tuning.cli", "sweep", "--name", name, "--output", str(out)),
                *("--space", "smoke", "--pretrained", "none", "--trials", str(TRIALS), "--epochs", str(EPOCHS)),
                *("--cpus-per-trial", "0.5", "--set", "measure.enabled=false", "--objective", "val_acc"),
            ],
            env=base_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("left", "right")
    ]
    outputs = [driver.communicate(timeout=900)[0] for driver in drivers]
    for driver, output in zip(drivers, outputs, strict=True):
        assert driver.returncode == 0, output[-3000:]
        assert "locked" not in output and "does not answer" not in output, output[-3000:]
    for name in ("left", "right"):
        audit_sweep(f"sqlite:///{out / 'mlflow.db'}", name, trials=TRIALS, epochs=EPOCHS)
        assert not (out / "ray_results" / name / "tracking_outbox.rejected.jsonl").exists()
