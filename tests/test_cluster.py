"""A real two-node Ray cluster on loopback (``ray start`` head + worker, logical GPUs) and a real
MLflow tracking server (``hesstune server``): trials land on both nodes, pack fractional GPUs,
and log over http. The cluster is torn down by its own temp dir, never with ``ray stop``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    return {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    temp = tempfile.mkdtemp(prefix="htr", dir="/tmp")  # short: Ray's unix sockets live below it
    port = free_port()
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    try:
        subprocess.run(
            [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
            env=base_env(),
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            [RAY, "start", f"--address=127.0.0.1:{port}", *common],
            env=base_env(),
            check=True,
            capture_output=True,
            timeout=180,
        )
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["pkill", "-9", "-f", temp], check=False)
        time.sleep(2)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    out = tmp_path_factory.mktemp("server")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuning.cli", "server", "--port", str(port), "--output", str(out)],
        env=base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError("the MLflow server did not start") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def sweep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuning.cli", "sweep", *args],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_sweep_on_two_nodes_logs_to_the_server_and_packs_fractional_gpus(
    cluster: str, server: str, tmp_path: Path
) -> None:
    proc = sweep(
        "--address",
        cluster,
        "--tracking-uri",
        server,
        "--output",
        str(tmp_path),
        "--name",
        "c4",
        "--space",
        "smoke",
        "--trials",
        "6",
        "--epochs",
        "2",
        "--cpus-per-trial",
        "1",
        "--gpus-per-trial",
        "0.5",
        "--set",
        "measure.enabled=false",
        "--objective",
        "val_acc",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight: storage and tracking checked on 2 node(s)" in proc.stdout
    assert "View run" not in proc.stdout  # MLflow's per-run links against a server would bury the progress lines
    import mlflow

    mlflow.set_tracking_uri(server)
    runs = mlflow.search_runs(experiment_names=["c4"])
    children = runs[runs["tags.hesstune.role"] != "parent"]
    assert len(children) == 6 and set(children["status"]) == {"FINISHED"}
    assert children["tags.hesstune.node_id"].nunique() == 2, "trials did not land on both nodes"
    gpu_ids = children["tags.hesstune.gpu_ids"]
    assert gpu_ids.isin(["0", "1"]).all(), gpu_ids.tolist()  # one logical GPU id each: a 0.5 share


def test_sqlite_is_refused_on_a_cluster(cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = sweep("--address", cluster, "--output", str(out), "--space", "smoke", "--trials", "1")
    assert proc.returncode == 2 and "sqlite" in proc.stderr and "hesstune server" in proc.stderr
    assert not out.exists()


def test_unreachable_tracking_server_is_caught_by_the_preflight(cluster: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = sweep(
        "--address",
        cluster,
        "--tracking-uri",
        dead,
        "--output",
        str(tmp_path / "out"),
        "--space",
        "smoke",
        "--trials",
        "1",
        "--set",
        "measure.enabled=false",
        "--objective",
        "val_acc",
    )
    assert proc.returncode == 2 and "cannot reach the tracking server" in proc.stderr, proc.stderr[-2000:]
