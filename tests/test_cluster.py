"""A real two-node Ray cluster on loopback (``ray start`` head + worker, logical GPUs) and a real
MLflow tracking server (``hesstune server``): trials land on both nodes, pack fractional GPUs,
and log over http; on a private cluster, the worker node dies mid-sweep and its trials resume on
the head. Each node has its own temp dir, by which its processes are found and killed, never
with ``ray stop``."""

from __future__ import annotations

import contextlib
import json
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.audit import audit_sweep
from tests.processes import process_table, with_descendants

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


@dataclass(frozen=True)
class Cluster:
    """A running two-node loopback cluster: its GCS address and each node's own ``--temp-dir``."""

    address: str
    head: str
    worker: str


def node_processes(temp: str) -> set[int]:
    """The processes of the Ray node started with ``--temp-dir=temp``: those whose command line
    names that folder (raylet, GCS, monitors) and all their descendants (agents and workers, which
    rename themselves ``ray::…``). Read from /proc, so no other Ray instance can match."""
    table = process_table()
    names = (f"{temp}/".encode(), f"{temp}\0".encode())  # the folder itself, not one it is a prefix of
    found = with_descendants({pid for pid, (_, cmd) in table.items() if any(n in cmd for n in names)}, table)
    return found - {os.getpid()}


def kill_node(temp: str) -> set[int]:
    """SIGKILL every process of the node with ``--temp-dir=temp``, frozen first (SIGSTOP) so that
    none spawns a worker the kill would miss; returns the PIDs killed."""
    frozen: set[int] = set()
    for _ in range(3):
        new = node_processes(temp) - frozen
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= new
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return frozen


def node_id(temp: str) -> str:
    """The Ray node id of the node with ``--temp-dir=temp``, from its raylet's command line."""
    for pid in node_processes(temp):
        with contextlib.suppress(OSError):
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"):
                if arg.startswith("--node_id="):
                    return arg.removeprefix("--node_id=")
    raise AssertionError(f"no raylet with --temp-dir {temp}")


@contextlib.contextmanager
def two_nodes(*, cpus: int = 2, gpus: int = 2) -> Iterator[Cluster]:
    """``ray start`` a head and a worker node on loopback (``cpus`` CPUs and ``gpus`` logical GPUs
    each), each with its own temp dir, so either can be killed alone; both are killed when the
    block ends."""
    head = tempfile.mkdtemp(prefix="htr", dir="/tmp")  # short: Ray's unix sockets live below them
    worker = tempfile.mkdtemp(prefix="htw", dir="/tmp")
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--disable-usage-stats"]
    try:
        subprocess.run(
            [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={head}", *common],
            env=base_env(),
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            [RAY, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={worker}", *common],
            env=base_env(),
            check=True,
            capture_output=True,
            timeout=180,
        )
        yield Cluster(f"127.0.0.1:{port}", head, worker)
    finally:
        for temp in (worker, head):
            kill_node(temp)
        time.sleep(2)
        for temp in (worker, head):
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with two_nodes() as nodes:
        yield nodes.address


@contextlib.contextmanager
def running_server(out: Path, *flags: str, env: dict[str, str] | None = None, port: int = 0) -> Iterator[str]:
    """``hesstune server`` on loopback ``port`` (default: a free one), until the block ends; yields its URL."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuning.cli", "server", "--port", str(port), "--output", str(out), *flags],
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


def wait_for_trial_on(
    node: str, uri: str, sweep_name: str, *, before: int, driver: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Until a child run of ``sweep_name`` placed on ``node`` has logged an epoch from 1 to
    ``before`` − 1: a trial runs there, past a checkpoint, with epochs still to go. Fails at once
    if the sweep's ``driver`` exits meanwhile, with the end of its ``log``."""
    import mlflow

    from tuning.tracking import mlflow_key

    mc = mlflow.MlflowClient(uri)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert driver.poll() is None, f"the sweep ended before a trial ran on {node[:12]}: {log.read_text()[-3000:]}"
        experiment = mc.get_experiment_by_name(sweep_name)
        if experiment is not None:
            runs = mc.search_runs([experiment.experiment_id], filter_string=f"tags.`hesstune.node_id` = '{node}'")
            if any(1 <= r.data.metrics.get(mlflow_key("epoch"), 0) < before for r in runs):
                return
        time.sleep(0.5)
    raise AssertionError(f"no trial of {sweep_name} logged an epoch on node {node[:12]} within {timeout} s")


def tune_results(trial_folder: Path) -> list[dict[str, Any]]:
    """The results Tune's driver recorded for a trial (``result.json``), in order."""
    return [json.loads(line) for line in (trial_folder / "result.json").read_text().splitlines() if line.strip()]


def test_a_dead_node_s_trials_resume_from_their_checkpoints_on_the_other_node(server: str, tmp_path: Path) -> None:
    """The worker node of a private two-node cluster is killed (its raylet and every Ray process
    it spawned, SIGKILL) while a trial runs there past epoch 1. The sweep still ends with the 4
    trials it asked for, each with one FINISHED child run (the shared audit), and a trial that was
    on the dead node finished on the head from its last checkpoint: Tune restored it there
    (``iterations_since_restore`` starts again at 1) and the trainable went on from the
    checkpoint's epoch (each epoch reported once, the first ones from the dead node)."""
    name, trials, epochs = "node-death", 4, 6
    out, log = tmp_path / "out", tmp_path / "driver.log"
    with two_nodes(cpus=1, gpus=0) as nodes:  # one trial at a time on each node
        dead = node_id(nodes.worker)
        args = ["--address", nodes.address, "--tracking-uri", server, "--output", str(out), "--name", name]
        args += ["--space", "smoke", "--trials", str(trials), "--epochs", str(epochs), "--cpus-per-trial", "1"]
        args += ["--max-failures", "1", "--set", "measure.enabled=false", "--objective", "val_acc"]
        args += ["--set", "model.pretrained=none"]  # no source pretraining: it has nothing to do with nodes
        with open(log, "w") as fh:
            driver = subprocess.Popen(
                [sys.executable, "-m", "tuning.cli", "sweep", *args],
                env=base_env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_trial_on(dead, server, name, before=3, driver=driver, log=log, timeout=300)
            assert kill_node(nodes.worker), "the worker node had no process left to kill"
            assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    children = audit_sweep(server, name, trials=trials, epochs=epochs)
    resumed = []
    for _, run in children.iterrows():
        folder = out / "ray_results" / name / f"trial_{run['tags.hesstune.trial_id']}"
        rows = tune_results(folder)  # where each epoch ran, as Tune recorded it on the driver
        assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1)), rows
        there = sum(r["node_id"] == dead for r in rows)
        if there in (0, epochs):
            continue  # never on the dead node, or finished there before the kill
        resumed.append(run["tags.hesstune.trial_id"])
        assert all(r["node_id"] != dead for r in rows[there:]), "a trial went back to the dead node"
        assert rows[there]["iterations_since_restore"] == 1, "Tune did not restore the trial after the node died"
        assert (folder / "error.txt").read_text().count("Failure # ") == 1, "Tune did not record one failure"
        assert pd.isna(run.get("tags.hesstune.replayed_epochs")), "the trial restarted instead of resuming"
        assert run["tags.hesstune.node_id"] == rows[-1]["node_id"], "the run's node tag did not follow the trial"
    assert resumed, "no trial was running on the killed node when it died"
