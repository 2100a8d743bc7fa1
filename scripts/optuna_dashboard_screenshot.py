"""Run a small two-objective sweep, open its Optuna study in optuna-dashboard, screenshot it.

    uv run --with optuna-dashboard==0.21.0 python scripts/optuna_dashboard_screenshot.py [--output DIR]

Writes ``docs/optuna_dashboard.png`` (the study's history page: the Pareto front of val_acc and
bound) with headless Chromium (Debian's ``chromium`` package). The dashboard reads the sweep's
journal file, ``<output>/ray_results/NAME/optuna.journal``, is bound to 127.0.0.1 and is stopped
at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow_screenshot import ROOT, screenshot

NAME = "dashboard-demo"


def wait_for(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"optuna-dashboard at {url} did not answer within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(tempfile.gettempdir()) / "hesstune-dashboard-demo"))
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    dashboard = shutil.which("optuna-dashboard")
    if dashboard is None:
        raise SystemExit("optuna-dashboard not found: run this with uv run --with optuna-dashboard==0.21.0")
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "disabled"}
    sweep = ["sweep", "--space", "smoke", "--trials", str(args.trials), "--epochs", "3", "--noise", "pair:0.4"]
    sweep += ["--objective", "val_acc,bound", "--output", str(out), "--name", NAME]
    subprocess.run([sys.executable, "-m", "tuning.cli", *sweep], env=env, check=True)
    journal = out / "ray_results" / NAME / "optuna.journal"
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [dashboard, str(journal), "--host", "127.0.0.1", "--port", str(args.port), "--quiet"],
        env=env,
        start_new_session=True,
    )
    try:
        wait_for(f"{url}/api/studies")
        (ROOT / "docs").mkdir(exist_ok=True)
        screenshot(f"{url}/dashboard/studies/0", ROOT / "docs" / "optuna_dashboard.png", height=1600)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
