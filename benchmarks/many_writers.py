"""Many writers on one MLflow store: K processes log at once, as K sweep drivers sharing a store do.

    uv run python benchmarks/many_writers.py [--writers 8] [--epochs 20] [--metrics 60]

In a sweep, every MLflow write comes from the driver (``tuning.callbacks.TrackingCallback``); the
trials never talk to the store. So concurrent trials of one sweep are one writer, and the
contended case is several sweeps (or other clients) on one store. Here each writer process does
what the driver does for one trial, through the product's own ``tuning.tracking`` calls: it
opens a child run under a parent, logs ``--epochs`` epochs of ``--metrics`` values (one
``log_batch`` per epoch, retried on sqlite's "database is locked"), tags it final and ends it.
All writers start together (a barrier). Then every run is read back: each metric must hold every
epoch exactly once.

Run against the local sqlite store and against ``hesstune server`` (started here on loopback).
Prints one line per store: writers, failed writers, metric points lost and duplicated, wall
seconds, and ends with ``lost_or_duplicated: <n>`` over both.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" line per run

from tuning.tracking import client, ensure_parent_run, log_metrics, open_child


def writer(uri: str, exp_id: str, parent_id: str, index: int, epochs: int, metrics: int, start: object) -> None:
    mc = client(uri)
    run_id = open_child(mc, exp_id, parent_id, f"w{index}", f"writer-{index}", {"writer": index})
    start.wait()  # type: ignore[attr-defined]
    for epoch in range(1, epochs + 1):
        values = {f"m{k:03d}": index + epoch / 1000 + k / 1e6 for k in range(metrics)}
        log_metrics(mc, run_id, values, step=epoch)
    mc.set_tag(run_id, "hesstune.final", "1")
    mc.set_terminated(run_id, status="FINISHED")


def audit(uri: str, exp_id: str, parent_id: str, epochs: int, metrics: int) -> tuple[int, int, int]:
    """(runs found, metric points lost, metric points duplicated) over the parent's children."""
    mc = client(uri)
    runs = mc.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    lost = duplicated = 0
    for run in runs:
        for k in range(metrics):
            steps = [m.step for m in mc.get_metric_history(run.info.run_id, f"m{k:03d}")]
            lost += len(set(range(1, epochs + 1)) - set(steps))
            duplicated += len(steps) - len(set(steps))
    return len(runs), lost, duplicated


def measure(uri: str, name: str, args: argparse.Namespace, artifacts: Path) -> int:
    exp_id, parent_id = ensure_parent_run(uri, name, tags={}, params={}, artifacts=artifacts)
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=writer, args=(uri, exp_id, parent_id, i, args.epochs, args.metrics, start))
        for i in range(args.writers)
    ]
    for p in procs:
        p.start()
    time.sleep(args.settle_s)  # every writer has imported mlflow and opened its run
    tic = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    wall = time.perf_counter() - tic
    failed = sum(p.exitcode != 0 for p in procs)
    found, lost, duplicated = audit(uri, exp_id, parent_id, args.epochs, args.metrics)
    lost += (args.writers - found) * args.epochs * args.metrics
    points = args.writers * args.epochs * args.metrics
    print(
        f"{name}: {args.writers} writers x {args.epochs} epochs x {args.metrics} metrics = {points} points; "
        f"failed writers {failed}, runs found {found}, lost {lost}, duplicated {duplicated}, {wall:.1f} s",
        flush=True,
    )
    return lost + duplicated + failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--metrics", type=int, default=60)
    parser.add_argument("--settle-s", type=float, default=20.0)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="many-writers-"))
    bad = measure(f"sqlite:///{out / 'mlflow.db'}", "sqlite", args, out / "mlartifacts")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tuning.cli", "server", "--port", str(port), "--output", str(out / "server")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                time.sleep(1)
        bad += measure(url, "server", args, out / "unused")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"lost_or_duplicated: {bad}")


if __name__ == "__main__":
    main()
