"""Start a real MLflow server on loopback, run a small sweep against it, screenshot the UI.

    uv run python scripts/mlflow_screenshot.py [--output DIR] [--port 5123]

Writes ``docs/mlflow_compare.png`` (the compare view of the sweep's child runs) and
``docs/mlflow_runs.png`` (the experiment's runs table) with headless Chromium (Debian's
``chromium`` package: ``apt-get install chromium``). The server is bound to 127.0.0.1 and
stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_for_server(url: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"MLflow server at {url} did not answer within {timeout:.0f} s")


def screenshot(url: str, path: Path, height: int = 1000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--window-size=1400,{height}",
                "--virtual-time-budget=20000",
                f"--screenshot={path}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    print(f"wrote {path}")


def compare_url(base: str, run_ids: list[str], exp_id: str) -> str:
    runs = urllib.parse.quote(json.dumps(run_ids))
    exps = urllib.parse.quote(json.dumps([exp_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(tempfile.gettempdir()) / "hesstune-ui-demo"))
    parser.add_argument("--port", type=int, default=5123)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen(
        [sys.executable, "-m", "tuning.cli", "server", "--port", str(args.port), "--output", str(out)],
        env=env,
        start_new_session=True,
    )
    try:
        wait_for_server(url)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tuning.cli",
                "sweep",
                "--space",
                "smoke",
                "--trials",
                str(args.trials),
                "--epochs",
                "3",
                "--tracking-uri",
                url,
                "--output",
                str(out),
                "--name",
                "ui-demo",
            ],
            env=env,
            check=True,
        )
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("ui-demo")
        runs = client.search_runs([exp.experiment_id])  # a != filter would drop runs without the tag
        children = [r.info.run_id for r in runs if r.data.tags.get("hesstune.role") != "parent"]
        (ROOT / "docs").mkdir(exist_ok=True)
        screenshot(compare_url(url, children, exp.experiment_id), ROOT / "docs" / "mlflow_compare.png", height=2400)
        screenshot(f"{url}/#/experiments/{exp.experiment_id}/runs", ROOT / "docs" / "mlflow_runs.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
