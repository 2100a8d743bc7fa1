"""Faults: the driver killed with SIGKILL then resumed, trials that raise, diverge, or lose
their worker. Real local Ray and a real sqlite MLflow store; the CLI runs in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.audit import audit_sweep
from tests.processes import process_table, with_descendants

pytestmark = pytest.mark.slow

NO_MEASURE = ["--set", "measure.enabled=false", "--objective", "val_acc"]


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HESSTUNE_CACHE", str(tmp_path / "cache"))
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuning.cli", *args]


def run_sweep(env: dict[str, str], out: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A sweep without measures through the CLI; it must exit 0."""
    proc = subprocess.run(
        cli("sweep", "--output", str(out), "--name", name, *args, *NO_MEASURE),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def runs(out: Path, name: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=[name])
    return df[df["tags.hesstune.role"] != "parent"], df[df["tags.hesstune.role"] == "parent"]


def wait_for_lines(log: Path, prefix: str, count: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and sum(line.startswith(prefix) for line in log.read_text().splitlines()) >= count:
            return
        time.sleep(1.0)
    raise AssertionError(f"{count} lines starting {prefix!r} not seen in {timeout} s:\n{log.read_text()[-3000:]}")


def test_kill_driver_then_resume_finishes_every_trial_exactly_once(tmp_path: Path, env: dict[str, str]) -> None:
    out, log = tmp_path / "out", tmp_path / "driver.log"
    args = cli(
        "sweep", "--space", "smoke", "--trials", "5", "--epochs", "4", "--output", str(out), "--name", "k9", *NO_MEASURE
    )
    with open(log, "w") as fh:
        driver = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_lines(log, "[", 2, timeout=420)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    children, _ = runs(out, "k9")
    assert len(children) < 5 or (children["status"] == "RUNNING").any(), "the kill came too late to test resume"
    time.sleep(3)
    proc = subprocess.run(
        cli("sweep", "--resume", "k9", "--output", str(out)), env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # resumed from checkpoints, no epoch logged twice; a trial that started after Tune's last state
    # save is unknown to the resumed sweep: its run is ended, tagged lost, and not counted
    audit_sweep(f"sqlite:///{out / 'mlflow.db'}", "k9", trials=5, epochs=4)
    children, parent = runs(out, "k9")
    lost = children.get("tags.hesstune.lost", pd.Series(None, index=children.index)).notna()
    assert parent["metrics.n_trials"].iloc[0] == 5
    from optuna.trial import TrialState

    from tuning.sweep import load_study

    # the persisted study: 5 complete; asks lost with the driver (a lost run's among them) marked FAIL
    states = [t.state for t in load_study(out, "k9").trials]
    assert states.count(TrialState.COMPLETE) == 5 and TrialState.RUNNING not in states
    assert states.count(TrialState.FAIL) >= lost.sum()


def test_failing_and_diverging_trials_end_failed_and_the_sweep_goes_on(tmp_path: Path, env: dict[str, str]) -> None:
    space = tmp_path / "space.yaml"
    # SGD at lr 1e8 makes the loss NaN/inf: those trials must end FAILED with the reason, the others FINISHED
    space.write_text(
        "fixed: {optim.name: sgd}\n"
        "params:\n"
        "  optim.lr: {categorical: [1.0e-3, 1.0e+8]}\n"
        "  optim.momentum: {float: [0.5, 0.9]}\n"
    )
    out = tmp_path / "out"
    proc = run_sweep(env, out, "bad", "--space", str(space), "--trials", "4", "--epochs", "2", "--max-failures", "0")
    children, parent = runs(out, "bad")
    assert len(children) == 4 and "RUNNING" not in set(children["status"])
    lrs = children["params.optim.lr"].astype(float)
    diverged = children[lrs > 1]
    assert len(diverged) >= 1 and set(diverged["status"]) == {"FAILED"}, children[["status", "params.optim.lr"]]
    assert diverged["tags.hesstune.error"].str.contains("lower optim.lr").all()
    assert (lrs < 1).any() and set(children[lrs < 1]["status"]) == {"FINISHED"}
    assert "FAILED" in proc.stdout and parent["status"].iloc[0] == "FINISHED"


def test_a_trial_that_raises_with_a_damaged_checkpoint_falls_back_to_the_one_before(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Each trial truncates its newest checkpoint (epoch 2's, as a write cut short would) and
    raises; the retry finds it does not match its checksum, resumes from epoch 1's, and says so."""
    out = tmp_path / "out"
    env = {**env, "HESSTUNE_FAULT": "corrupt-once@2", "HESSTUNE_FAULT_DIR": str(tmp_path)}
    run_sweep(env, out, "retry", "--space", "smoke", "--trials", "2", "--epochs", "3", "--max-failures", "1")
    assert len(list(tmp_path.glob("fault-*"))) == 2  # each trial did fail once
    children = audit_sweep(f"sqlite:///{out / 'mlflow.db'}", "retry", trials=2, epochs=3)  # epoch 2 logged once
    for _, run in children.iterrows():
        assert run["tags.hesstune.replayed_epochs"] == "2"  # though it ran twice
        recovery = run["tags.hesstune.checkpoint_recovery"]
        assert recovery.startswith("checkpoint_000001 damaged") and recovery.endswith(
            "resumed from checkpoint_000000 (epoch 1)"
        ), recovery
    for folder in (out / "ray_results" / "retry").glob("trial_*"):  # two kept: the newest has its checksum
        assert len(list(folder.glob("checkpoint_*/state.sha256"))) == 2


def test_a_killed_trial_worker_is_retried(tmp_path: Path, env: dict[str, str]) -> None:
    out, log = tmp_path / "out", tmp_path / "driver.log"
    args = cli(
        "sweep",
        "--space",
        "smoke",
        "--trials",
        "2",
        "--epochs",
        "6",
        "--concurrency",
        "1",
        "--output",
        str(out),
        "--name",
        "wk",
        "--max-failures",
        "2",
        *NO_MEASURE,
    )
    with open(log, "w") as fh:
        driver = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        victim = _wait_for_trial_worker(out, driver.pid, timeout=300)
        os.kill(victim, signal.SIGKILL)
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    audit_sweep(f"sqlite:///{out / 'mlflow.db'}", "wk", trials=2, epochs=6)


def _wait_for_trial_worker(out: Path, driver: int, timeout: float) -> int:
    """PID of a Ray actor running one of ``driver``'s trials, once a trial has logged its first epoch."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            children, _ = runs(out, "wk")
            started = "metrics.xtra/epoch" in children and (children["metrics.xtra/epoch"] >= 1).any()
        except Exception:
            started = False
        table = process_table()  # the driver's own Ray: other tests' trials are not below it
        pids = [pid for pid in with_descendants({driver}, table) if b"ray::ImplicitFunc" in table[pid][1]]
        if started and pids:
            return pids[0]
        time.sleep(1.0)
    raise AssertionError("no trial worker appeared")
