"""``hesstune server --auth``: MLflow's basic-auth app in front of the tracking store. Without
credentials a client can neither read nor write runs, and a sweep refuses to start in one line;
with them the sweep runs, and its password is in no run param, tag or file it wrote."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit import audit_sweep
from tests.test_cluster import base_env, running_server

pytestmark = pytest.mark.slow
USER, PASSWORD = "hesstune-admin", "a-long-test-password-7731"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    out = tmp_path_factory.mktemp("auth")
    creds = out / "creds.yaml"
    creds.write_text(f"username: {USER}\npassword: {PASSWORD}\n")
    creds.chmod(0o600)
    with running_server(out / "server", "--auth", "--auth-file", str(creds)) as url:
        yield url, out


def sweep(url: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = ["sweep", "--space", "smoke", "--trials", "2", "--epochs", "1", "--tracking-uri", url]
    args += ["--output", str(out), "--name", "guarded", "--set", "measure.enabled=false", "--objective", "val_acc"]
    return subprocess.run(
        [sys.executable, "-m", "tuning.cli", *args], env=env, capture_output=True, text=True, timeout=900
    )


def test_without_credentials_nothing_is_read_written_or_started(
    auth_server: tuple[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tuning.cli import main

    url, tmp = auth_server
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    args = ["sweep", "--space", "smoke", "--tracking-uri", url, "--output", str(tmp / "anonymous")]
    assert main(args) == 2  # the CLI in-process: validation refuses before Ray or MLflow start
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "asks for a user and password (HTTP 401): set MLFLOW_TRACKING_USERNAME" in errors[0]
    assert not (tmp / "anonymous").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    assert main(args) == 2 and f"refused user '{USER}' (HTTP 401)" in capsys.readouterr().err
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key)
    anonymous = MlflowClient(tracking_uri=url)
    for attempt in (lambda: anonymous.search_experiments(), lambda: anonymous.create_experiment("intruder")):
        with pytest.raises(MlflowException, match=r"401|Unauthorized|credentials"):
            attempt()


def test_with_credentials_a_sweep_runs_and_its_password_is_nowhere(auth_server: tuple[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    url, tmp = auth_server
    out = tmp / "guarded"
    env = {**base_env(), "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    proc = sweep(url, out, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", USER)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        mc = MlflowClient(tracking_uri=url)
        runs = mc.search_runs([mc.get_experiment_by_name("guarded").experiment_id])
        audit_sweep(url, "guarded", trials=2, epochs=1)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # parent + 2 trials
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values(), *run.data.params, *run.data.tags]
        assert not any(PASSWORD in str(v) for v in values), run.info.run_id
    assert PASSWORD not in proc.stdout + proc.stderr
    written = [p for p in (out, tmp / "server") if p.exists()]
    for path in (f for folder in written for f in folder.rglob("*") if f.is_file()):
        assert PASSWORD.encode() not in path.read_bytes(), path
