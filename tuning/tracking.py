"""MLflow tracking: one parent run per sweep, one child run per trial (docs/design.md).

All writes happen on the driver (a Ray Tune callback), so there is one writer per run and no
experiment-creation race between trials. Child runs are found again by their ``trial_id`` tag,
so a resumed or retried trial reopens its run instead of creating a second one, and every run
ends with its true status (FINISHED / FAILED / KILLED); none is left RUNNING.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainables import metrics
from trainables.errors import HesstuneError

__all__ = [
    "TrackingError",
    "check_tracking_access",
    "child_runs",
    "client",
    "default_tracking_uri",
    "ensure_parent_run",
    "finish_orphans",
    "log_metrics",
    "metric_name",
    "mlflow_key",
    "open_child",
    "server_auth_environment",
    "set_text_tags",
    "text_from_tags",
    "validate_tracking_uri",
]

SWEEP_TAG = "hesstune.sweep"

# MLflow's compare view lists metric keys in code-point order. A trial's headline metrics keep
# bare names and everything else it reports goes under DETAIL_PREFIX ("xtra/" sorts after
# "val_loss"), so measure, bound, gap and the accuracies are listed together at the top; they are
# also logged first, which is the metric MLflow's parallel-coordinates plot opens with.
HEADLINE_METRICS = metrics.HEADLINE
DETAIL_PREFIX = "xtra/"
TRIAL_TAG = "hesstune.trial_id"
PARENT_TAG = "mlflow.parentRunId"


class TrackingError(HesstuneError):
    """A tracking URI or store problem, with the fix in the message."""


def default_tracking_uri(output: Path) -> str:
    return f"sqlite:///{output.resolve() / 'mlflow.db'}"


def validate_tracking_uri(uri: str, *, multi_node: bool = False) -> str:
    """Accept ``sqlite:////abs/path.db`` (single machine) and ``http(s)://host:port``."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise TrackingError(f"tracking URI {uri!r} has no host: use http://HOST:PORT")
        return uri
    if parsed.scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if not path.startswith("/"):
            raise TrackingError(
                f"tracking URI {uri!r} is relative: each Ray worker would open its own file; "
                "use sqlite:////absolute/path/mlflow.db"
            )
        if multi_node:
            raise TrackingError(
                f"tracking URI {uri!r} is a local sqlite file, unreachable from other nodes: "
                "start `hesstune server` and pass --tracking-uri http://HEAD:5000"
            )
        return uri
    if parsed.scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri!r} is a file store, which MLflow ≥ 3.13 rejects: "
            "use sqlite:////abs/path/mlflow.db or an http:// tracking server"
        )
    raise TrackingError(f"tracking URI {uri!r} has unsupported scheme {parsed.scheme!r}: use sqlite:// or http://")


AUTH_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # MLflow's own client settings
ADMIN_ENV = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")  # its auth app's admin


def check_tracking_access(uri: str, *, timeout: float = 10.0) -> None:
    """An http(s) tracking server must answer, and let this client in with the credentials in
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``: one line naming the fix if not."""
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.request

    user, password = (os.environ.get(k) for k in AUTH_ENV)
    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code == 401 and not (user and password):
            raise TrackingError(
                f"the tracking server {uri} asks for a user and password (HTTP 401): set {AUTH_ENV[0]} and "
                f"{AUTH_ENV[1]}"
            ) from None
        if exc.code == 401:
            raise TrackingError(
                f"the tracking server {uri} refused user {user!r} (HTTP 401): check {AUTH_ENV[1]}"
            ) from None
        if exc.code == 403:
            raise TrackingError(
                f"the tracking server {uri} lets user {user!r} in but not read experiments (HTTP 403): ask its "
                "admin for permissions"
            ) from None
        raise TrackingError(f"the tracking server {uri} answered HTTP {exc.code}") from None
    except OSError as exc:
        raise TrackingError(f"cannot reach the tracking server {uri} ({exc}): start it, or check the URI") from None


def server_auth_environment(output: Path, auth_file: Path | None) -> dict[str, str]:
    """What ``mlflow server --app-name basic-auth`` needs, as environment variables (never the
    command line): its config (users in ``<output>/basic_auth.db``), a CSRF secret kept in
    ``<output>/flask_secret_key`` (mode 600, the same across restarts), and the admin's name and
    password, from ``auth_file`` (YAML, readable by its owner only) or ``MLFLOW_AUTH_ADMIN_*``."""
    import secrets
    import stat

    import yaml

    if auth_file is not None:
        try:
            mode = auth_file.stat().st_mode
            creds = yaml.safe_load(auth_file.read_text())
        except OSError as exc:
            raise TrackingError(f"--auth-file {str(auth_file)!r} cannot be read ({exc.strerror})") from None
        if stat.S_IMODE(mode) & 0o077:
            raise TrackingError(
                f"--auth-file {str(auth_file)!r} can be read by others (mode {stat.S_IMODE(mode):o}): chmod 600 it"
            )
        if not isinstance(creds, dict) or not creds.get("username") or not creds.get("password"):
            raise TrackingError(f"--auth-file {str(auth_file)!r} needs two keys: username: … and password: …")
        admin = {ADMIN_ENV[0]: str(creds["username"]), ADMIN_ENV[1]: str(creds["password"])}
    else:
        admin = {k: os.environ.get(k, "") for k in ADMIN_ENV}
        if not all(admin.values()):
            raise TrackingError(
                f"--auth needs the admin's user and password: set {ADMIN_ENV[0]} and {ADMIN_ENV[1]}, or give "
                "--auth-file FILE (YAML with username and password, chmod 600)"
            )
    if len(admin[ADMIN_ENV[1]]) < 12:
        raise TrackingError(
            "the admin password is shorter than 12 characters, which MLflow refuses: choose a longer one"
        )
    output.mkdir(parents=True, exist_ok=True)
    config = output / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{output.resolve() / 'basic_auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    key_file = output / "flask_secret_key"
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_hex(32))
    secret = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or key_file.read_text().strip()
    return {**admin, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret}


_READY: set[str] = set()  # sqlite stores whose schema this process has seen created


def client(uri: str) -> Any:
    """An MLflow client of ``uri``. A sqlite store is created under a file lock: MLflow builds a
    new file's tables in steps, and two sweeps started at once in one --output would otherwise
    both build them (the second fails in the middle of alembic's migration)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _READY:
        return MlflowClient(tracking_uri=uri)
    import fcntl

    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        mc = MlflowClient(tracking_uri=uri)  # opens the store: creates or migrates its tables
    _READY.add(uri)
    return mc


def _retry(fn: Any, *args: Any, attempts: int = 5, **kwargs: Any) -> Any:
    """sqlite stores raise 'database is locked' under concurrent writers: back off and retry."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
    return None


# MLflow 3.x opens an experiment without this tag in its GenAI view (a sweep's parent run then sits
# under "Evaluations"); "custom_model_development" is its kind for model-training experiments
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def ensure_parent_run(
    uri: str, sweep: str, *, tags: Mapping[str, str], params: Mapping[str, Any], artifacts: Path | None = None
) -> tuple[str, str]:
    """The sweep's experiment and parent run, created once; a resumed sweep reuses both.
    ``artifacts``: where a new experiment of a sqlite store keeps its artifacts (MLflow's default
    is ``./mlruns`` of whatever directory the command runs in); a server decides for itself."""
    mc = client(uri)
    exp = mc.get_experiment_by_name(sweep)
    location = artifacts.resolve().as_uri() if artifacts is not None and uri.startswith("sqlite:") else None
    exp_id = exp.experiment_id if exp else mc.create_experiment(sweep, artifact_location=location, tags=EXPERIMENT_TAGS)
    found = mc.search_runs(
        [exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`hesstune.role` = 'parent'"
    )
    if found:
        run_id = found[0].info.run_id
        mc.update_run(run_id, status="RUNNING")
        return exp_id, run_id
    run = mc.create_run(exp_id, run_name=sweep, tags={**tags, SWEEP_TAG: sweep, "hesstune.role": "parent"})
    _log_params(mc, run.info.run_id, params)
    return exp_id, run.info.run_id


TEXT_TAG_CHARS = 8000  # MLflow's longest tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)


def set_text_tags(mc: Any, run_id: str, name: str, text: str) -> None:
    """A long text as tags ``hesstune.<name>.0``, ``.1``, … of ≤ 8000 characters (MLflow truncates
    longer tag values); :func:`text_from_tags` joins them back."""
    from mlflow.entities import RunTag

    chunks = [text[i : i + TEXT_TAG_CHARS] for i in range(0, len(text), TEXT_TAG_CHARS)] or [""]
    _retry(mc.log_batch, run_id, tags=[RunTag(f"hesstune.{name}.{i}", c) for i, c in enumerate(chunks)])


def text_from_tags(row: Mapping[str, Any], name: str) -> str | None:
    """The text :func:`set_text_tags` stored, from a ``search_runs`` row (``tags.*`` keys); None if absent."""
    prefix = f"tags.hesstune.{name}."
    parts = {int(k[len(prefix) :]): v for k, v in row.items() if k.startswith(prefix) and isinstance(v, str)}
    return "".join(parts[i] for i in range(len(parts))) if parts and set(parts) == set(range(len(parts))) else None


def _log_params(mc: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        _retry(mc.log_batch, run_id, params=items[i : i + 100])


def log_metrics(
    mc: Any, run_id: str, metrics: Mapping[str, Any], step: int, *, trial: bool = False, timestamp: int | None = None
) -> None:
    """Log every finite numeric metric in one batch (NaN/inf and non-numbers are skipped).
    ``trial``: a trial's metrics, named as in :func:`mlflow_key` and headline metrics first.
    ``timestamp``: when they were measured, in ms (default: now)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp is None else timestamp
    first = {k: i for i, k in enumerate(HEADLINE_METRICS)}
    keys = sorted(metrics, key=lambda k: first.get(k, len(first))) if trial else list(metrics)
    items = [
        Metric(logged_key(k, trial=trial), float(metrics[k]), now, step)
        for k in keys
        if isinstance(metrics[k], int | float) and not isinstance(metrics[k], bool) and math.isfinite(float(metrics[k]))
    ]
    for i in range(0, len(items), 500):
        _retry(mc.log_batch, run_id, metrics=items[i : i + 500])


def logged_key(key: str, *, trial: bool) -> str:
    """The MLflow name :func:`log_metrics` gives metric ``key`` (of a trial, or of the sweep)."""
    return mlflow_key(key) if trial else _metric_key(key)


def _metric_key(key: str) -> str:
    return key.replace(":", "_")


def mlflow_key(key: str) -> str:
    """A trial metric's MLflow name: headline metrics as they are, the rest under ``xtra/``."""
    return _metric_key(key if key in HEADLINE_METRICS else DETAIL_PREFIX + key)


def metric_name(mlflow_name: str) -> str:
    """The inverse of :func:`mlflow_key` (for ``metrics.*`` columns read back from MLflow)."""
    return mlflow_name.removeprefix(DETAIL_PREFIX)


def find_child(mc: Any, exp_id: str, parent_id: str, trial_id: str) -> str | None:
    runs = mc.search_runs(
        [exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    )
    return runs[0].info.run_id if runs else None


def open_child(
    mc: Any,
    exp_id: str,
    parent_id: str,
    trial_id: str,
    name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> str:
    """The trial's child run: reopened when it exists (resume/retry), created otherwise."""
    run_id = find_child(mc, exp_id, parent_id, trial_id)
    if run_id is not None:
        _retry(mc.update_run, run_id, status="RUNNING")
        if params and not _retry(mc.get_run, run_id).data.params:  # created, then cut off before its params
            _log_params(mc, run_id, params)
        return run_id
    tags = {PARENT_TAG: parent_id, TRIAL_TAG: trial_id, **(tags or {})}
    run = _retry(mc.create_run, exp_id, run_name=name, tags=tags)
    _log_params(mc, run.info.run_id, params)
    return str(run.info.run_id)


def logged_epochs(mc: Any, run_id: str) -> int:
    """The last epoch a trial's run has logged (0 for none)."""
    value = _retry(mc.get_run, run_id).data.metrics.get(mlflow_key("epoch"))
    return int(value) if value is not None else 0


def child_runs(uri: str, exp_id: str, parent_id: str) -> Any:
    """All child runs of a sweep as a pandas DataFrame (``metrics.*``, ``params.*``, ``tags.*``)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50000)


def _running_children(mc: Any, exp_id: str, parent_id: str) -> list[Any]:
    return list(
        mc.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'")
    )


def end_lost_trials(mc: Any, exp_id: str, parent_id: str, known: set[str]) -> int:
    """End the RUNNING child runs whose trial the restored sweep does not know: trials that started
    after Tune last saved its state, before the driver died. Tagged ``hesstune.lost``; returns
    how many."""
    lost = [run for run in _running_children(mc, exp_id, parent_id) if run.data.tags.get(TRIAL_TAG) not in known]
    for run in lost:
        _retry(mc.set_tag, run.info.run_id, "hesstune.lost", LOST_TEXT)
        _retry(mc.set_terminated, run.info.run_id, status="KILLED")
    return len(lost)


LOST_TEXT = (
    "started after Tune last saved the sweep's state, before the driver died: the resumed sweep "
    "does not know this trial, and its searcher proposes another in its place"
)


def finish_orphans(mc: Any, exp_id: str, parent_id: str, status: str = "KILLED") -> int:
    """End any child still RUNNING (e.g. after the driver was killed); returns how many."""
    runs = _running_children(mc, exp_id, parent_id)
    for run in runs:
        _retry(mc.set_terminated, run.info.run_id, status=status)
    return len(runs)
