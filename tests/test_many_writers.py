"""Many writers on one tracking store: two sweeps at once, 4 concurrent trials each (8 in all, on
logical CPUs), logging every epoch to the same sqlite file and to the same `hesstune server`.
A sweep writes from its driver only, so two sweeps are two writers of one store: the contended
case. benchmarks/many_writers.py measures the same at 8 writers."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit import audit_sweep
from tests.test_cluster import base_env, running_server

pytestmark = pytest.mark.slow

TRIALS, EPOCHS = 4, 2


@contextlib.contextmanager
def store(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "server":
        with running_server(tmp_path / "server") as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"  # the default store of the shared --output


@pytest.mark.parametrize("kind", ["sqlite", "server"])
def test_two_sweeps_at_once_on_one_store_lose_and_repeat_nothing(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with store(kind, tmp_path) as uri:
        drivers = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "tuning.cli", "sweep", "--name", name, "--output", str(out)),
                    *("--tracking-uri", uri, "--space", "smoke", "--pretrained", "none"),
                    *("--trials", str(TRIALS), "--epochs", str(EPOCHS), "--cpus-per-trial", "0.5"),
                    *("--set", "measure.enabled=false", "--objective", "val_acc"),
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
            audit_sweep(uri, name, trials=TRIALS, epochs=EPOCHS)
            assert not (out / "ray_results" / name / "tracking_outbox.rejected.jsonl").exists()
