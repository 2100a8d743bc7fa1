"""A tracking server that goes away: stopped for 5 minutes in the middle of a sweep, and stopped
until after a sweep ends. Real `hesstune server` and sweep processes; the trials sleep after each
epoch (``HESSTUNE_FAULT=slow@S``) so that they outlast the outage while using little CPU."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.audit import audit_sweep
from tests.test_cluster import base_env, free_port, running_server

pytestmark = pytest.mark.slow

OUTAGE_S = 300  # MLflow's own retries absorb about 4 minutes; this must outlast them
SWEEP = [
    "--space",
    "smoke",
    "--pretrained",
    "none",
    "--epochs",
    "12",
    "--set",
    "measure.enabled=false",
    "--objective",
    "val_acc",
]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuning.cli", *args]


def wait_for_epoch(url: str, name: str, epoch: int, trials: int, timeout: float) -> None:
    """Until ``trials`` child runs of sweep ``name`` on the server have logged ``epoch``."""
    import mlflow

    mlflow.set_tracking_uri(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = mlflow.search_runs(experiment_names=[name])
        column = "metrics.xtra/epoch"
        if column in runs and (runs[column] >= epoch).sum() >= trials:
            return
        time.sleep(2)
    raise AssertionError(f"{trials} trial(s) of {name} did not reach epoch {epoch} in {timeout} s")


def test_a_sweep_outlives_tracking_outages_and_loses_no_metric(tmp_path: Path) -> None:
    """1. The server is down for 5 minutes mid-sweep: trials go on, their writes wait in the
    sweep's folder and reach the server, in order and once, when it is back; the sweep says how
    long tracking was behind. 2. The server goes down during an extension and stays down past its
    end: the sweep finishes and says what waits; `hesstune sync` refuses while the server is down
    and delivers everything once it is up."""
    out, store, port = tmp_path / "out", tmp_path / "server", free_port()
    env = {**base_env(), "HESSTUNE_FAULT": "slow@30"}
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "sweep.log"
    args = cli("sweep", *SWEEP, "--trials", "2", "--tracking-uri", url, "--output", str(out), "--name", "out")
    with running_server(store, port=port):
        with open(log, "w") as fh:
            driver = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT)
        wait_for_epoch(url, "out", 1, trials=2, timeout=300)
    down = time.time()  # the server is killed: 5 minutes without it
    try:
        time.sleep(OUTAGE_S)
        assert driver.poll() is None, f"the sweep ended during the outage:\n{log.read_text()[-3000:]}"
        with running_server(store, port=port):
            assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
            text = log.read_text()
            assert "does not answer" in text and "caught up after" in text, text[-3000:]
            behind = re.search(r"tracking: behind for (\d+) s in 1 outage", text)
            assert behind and int(behind.group(1)) >= OUTAGE_S - 30, text[-3000:]
            assert "Leaderboard by val_acc" in text
            children = audit_sweep(url, "out", trials=2, epochs=12)
            import mlflow

            parent = mlflow.search_runs(experiment_names=["out"], filter_string="tags.`hesstune.role` = 'parent'")
            assert parent["metrics.tracking_behind_s"].iloc[0] >= OUTAGE_S - 30
            for run_id in children["run_id"]:  # delivered in order: measured times rise with the epochs
                history = mlflow.MlflowClient(url).get_metric_history(run_id, "val_acc")
                stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
                assert stamps == sorted(stamps)
                assert max(stamps) > 1000 * (down + OUTAGE_S - 60)  # logged while the server was down
    finally:
        if driver.poll() is None:
            driver.kill()

    # 2. down from the extension's first epoch until after its end
    env["HESSTUNE_FAULT"] = "slow@1"
    extend = cli("sweep", "--resume", "out", "--trials", "3", "--output", str(out), "--tracking-wait", "5")
    with running_server(store, port=port):
        driver = subprocess.Popen(extend, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_epoch(url, "out", 1, trials=3, timeout=300)
    stdout, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, stdout[-3000:]
    assert "writes wait in" in stdout and "hesstune sync out" in stdout and "Leaderboard" not in stdout, stdout
    sync = cli("sync", "out", "--output", str(out), "--wait", "60")
    refused = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "cannot reach the tracking server" in refused.stderr, refused.stderr
    with running_server(store, port=port):
        synced = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=300)
        assert synced.returncode == 0, synced.stderr[-3000:]
        assert re.search(r"tracking is up to date .* \((\d+) writes sent now\)", synced.stdout), synced.stdout
        audit_sweep(url, "out", trials=3, epochs=12)
        again = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=300)
        assert "(0 writes sent now)" in again.stdout, again.stdout  # once: nothing is sent twice
