"""A real two-node Ray cluster on loopback (``ray start`` head + worker, logical GPUs) and a real
MLflow tracking server (``hesstune server``): trials land on both nodes, pack fractional GPUs,
and log over http. The cluster is torn down by its own temp dir, never with ``ray stop``."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def running_server(out: Path, *flags: str, env: dict[str, str] | None = None, port: int = 0) -> Iterator[str]:
    """``hesstune server`` on loopback ``port`` (default: a free one), until the block ends; yields its URL."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuning.cli", "server", "--port", str(port), "--output", str(out), *flags],
        env=env or base_env(),
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("server")) as url:
        yield url


def sweep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuning.cli", "sweep", *args],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def c4(
    cluster: str, server: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The 6-trial sweep on the two nodes, logged to the server: its --output and the process."""
    out = tmp_path_factory.mktemp("c4")
    proc = sweep(
        "--address",
        cluster,
        "--tracking-uri",
        server,
        "--output",
        str(out),
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
    return out, proc


def test_sweep_on_two_nodes_logs_to_the_server_and_packs_fractional_gpus(
    c4: tuple[Path, subprocess.CompletedProcess[str]], server: str
) -> None:
    proc = c4[1]
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


def test_export_register_to_the_server_gives_a_champion_that_predicts_as_the_export(
    c4: tuple[Path, subprocess.CompletedProcess[str]], server: str, tmp_path: Path
) -> None:
    """``export --register`` against the http server: the model is logged on the sweep's parent
    run through the server, and ``models:/c4-model@champion`` predicts as the exported weights."""
    out, swept = c4
    assert swept.returncode == 0, swept.stderr[-3000:]
    export = ["export", "c4", "--output", str(out), "-o", str(tmp_path / "best"), "--register", "c4-model"]
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", *export],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import mlflow
    import torch

    from tuning.export import load_model

    mlflow.set_tracking_uri(server)
    version = mlflow.MlflowClient(server).get_model_version_by_alias("c4-model", "champion")
    assert version.tags["criterion"] and version.tags["trial_id"]
    exported = load_model(tmp_path / "best")
    size = exported.preprocessing.image_size
    x = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    registered = mlflow.pytorch.load_model("models:/c4-model@champion")
    with torch.no_grad():
        assert torch.equal(registered(x).argmax(1), exported.model(x).argmax(1))
        assert torch.allclose(registered(x), exported.model(x), atol=1e-5)


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
