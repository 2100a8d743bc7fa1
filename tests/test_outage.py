"""A tracking server that goes away for 5 minutes while two sweeps log to it, 8 trials at once:
one sweep outlives the outage, the other ends before the server is back. Real `hesstune server`
and sweep processes; trials sleep after each epoch (``HESSTUNE_FAULT=slow@S``) so that they last
through the outage while using little CPU. With two sweeps (two writers) on one server, this is
also the many-writers test of `hesstune server` (tests/test_many_writers.py has the sqlite one)."""

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
COMMON = ["--space", "smoke", "--pretrained", "none", "--trials", "4", "--cpus-per-trial", "0.5"]
COMMON += ["--set", "measure.enabled=false", "--objective", "val_acc"]
LONG, SHORT = 12, 3  # epochs: the long sweep outlives the outage, the short one ends within it


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuning.cli", *args]


def sweep(name: str, epochs: int, url: str, out: Path, *extra: str) -> list[str]:
    return cli(
        "sweep", *COMMON, "--epochs", str(epochs), "--tracking-uri", url, "--output", str(out), "--name", name, *extra
    )


def wait_for_epoch(url: str, names: tuple[str, ...], trials: int, timeout: float) -> None:
    """Until every sweep in ``names`` has ``trials`` child runs on the server that logged epoch 1."""
    import mlflow

    mlflow.set_tracking_uri(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = mlflow.search_runs(experiment_names=list(names))
        if "metrics.xtra/epoch" in runs:
            started = runs[runs["metrics.xtra/epoch"] >= 1].groupby("experiment_id").size()
            if len(started) == len(names) and (started >= trials).all():
                return
        time.sleep(2)
    raise AssertionError(f"the trials of {names} did not all log an epoch in {timeout} s")


def test_sweeps_outlive_a_5_minute_tracking_outage_and_lose_no_metric(tmp_path: Path) -> None:
    """The server is killed once all 8 trials have logged an epoch, and restarted 5 minutes later.
    - The long sweep's trials go on; their writes wait in its folder and reach the server, in
      order and once, when it is back; it says how long tracking was behind.
    - The short sweep ends during the outage: it exits 0 naming `hesstune sync`, which refuses
      while the server is down and delivers everything, once, when it is up."""
    from tuning.outbox import undelivered

    out, store, port = tmp_path / "out", tmp_path / "server", free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**base_env(), "HESSTUNE_FAULT": "slow@30"}
    long_log = tmp_path / "long.log"
    with running_server(store, port=port):
        with open(long_log, "w") as fh:
            long = subprocess.Popen(
                sweep("long", LONG, url, out),
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        short = subprocess.Popen(
            sweep("short", SHORT, url, out, "--tracking-wait", "5"),
            env={**env, "HESSTUNE_FAULT": "slow@5"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_epoch(url, ("long", "short"), trials=4, timeout=400)
    down = time.time()  # the server is killed: 5 minutes without it
    sync = cli("sync", "short", "--output", str(out), "--wait", "60")
    try:
        stdout, _ = short.communicate(timeout=OUTAGE_S - 60)
        assert short.returncode == 0, stdout[-3000:]
        assert "writes wait in" in stdout and "hesstune sync short" in stdout and "Leaderboard" not in stdout, stdout
        refused = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "cannot reach the tracking server" in refused.stderr, refused.stderr
        time.sleep(max(0.0, down + OUTAGE_S - time.time()))
        assert long.poll() is None, f"the long sweep ended during the outage:\n{long_log.read_text()[-3000:]}"
        with running_server(store, port=port):
            assert long.wait(timeout=600) == 0, long_log.read_text()[-3000:]
            text = long_log.read_text()
            assert "does not answer" in text and "caught up after" in text and "locked" not in text, text[-3000:]
            behind = re.search(r"tracking: behind for (\d+) s in 1 outage", text)
            assert behind and int(behind.group(1)) >= OUTAGE_S - 30, text[-3000:]
            assert "Leaderboard by val_acc" in text
            children = audit_sweep(url, "long", trials=4, epochs=LONG)
            import mlflow

            parent = mlflow.search_runs(experiment_names=["long"], filter_string="tags.`hesstune.role` = 'parent'")
            assert parent["metrics.tracking_behind_s"].iloc[0] >= OUTAGE_S - 30
            for run_id in children["run_id"]:  # delivered in order: measured times rise with the epochs
                history = mlflow.MlflowClient(url).get_metric_history(run_id, "val_acc")
                stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
                assert stamps == sorted(stamps)
                assert max(stamps) > 1000 * (down + 60)  # measured while the server was down

            synced = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=300)
            assert synced.returncode == 0, synced.stderr[-3000:]
            sent = re.search(r"tracking is up to date .* \((\d+) writes sent now\)", synced.stdout)
            assert sent and int(sent.group(1)) > 0, synced.stdout
            audit_sweep(url, "short", trials=4, epochs=SHORT)
            assert undelivered(out / "ray_results" / "short") == 0  # so a second sync would send nothing
    finally:
        for proc in (long, short):
            if proc.poll() is None:
                proc.kill()
