"""hesstune: search hyperparameters for robust fine-tuning, select models by a Hessian bound.

Every command validates its input first; a problem is one line on stderr naming the value and
the fix, exit status 2, and nothing is started or written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainables import metrics
from trainables.config import RunConfig
from trainables.errors import HesstuneError
from tuning import api
from tuning.api import DEFAULT_OUTPUT, UsageError
from tuning.sweep import TRACKING_WAIT_S

__all__ = ["main"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set KEY=VALUE`` as dotted-key overrides (values read as YAML scalars)."""
    import yaml

    flat: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: use KEY=VALUE, e.g. --set optim.lr=3e-4")
        flat[key] = yaml.safe_load(value)
    return flat


# ``hesstune train`` without --config: what the methods study recommends on the built-in task
# (docs/methods.md): REGSL, distance constraint + self-labeling, at lr 1e-4 and radius 0.3 keeps
# gaining up to epoch 30 while memorising ~5 % of the wrong labels; plain Adam at lr 1e-3 (the
# RunConfig default, a sweep's base) peaks early and then memorises them.
RECOMMENDED_TRAIN: dict[str, Any] = {
    "epochs": 30,
    "optim.lr": 1e-4,
    "constraint.enabled": True,
    "constraint.mode": "projection",
    "constraint.radius": 0.3,
    "constraint.growth": 1.5,
    "constraint.head_radius": 1.0,
    "self_label.enabled": True,
    "self_label.threshold": 0.9,
    "self_label.correct_start": 10,
    "self_label.reweight_start": 5,
    "self_label.temperature": 2.0,
}


def _base_config(args: argparse.Namespace, default: RunConfig | None = None) -> RunConfig:
    return api.base_config(**_config_args(args), default=default)


def _config_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config flags as :func:`tuning.api.base_config` takes them."""
    names = ("config", "task", "model", "pretrained", "noise", "epochs", "seed")
    return {**{n: getattr(args, n, None) for n in names}, "overrides": _overrides(args)}


def _output(args: argparse.Namespace) -> Path:
    return Path(args.output).expanduser().resolve()


def _tracking_uri(args: argparse.Namespace, output: Path) -> str:
    from tuning.tracking import default_tracking_uri, validate_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(output)
    return validate_tracking_uri(uri, multi_node=bool(getattr(args, "address", None)))


# -- train ---------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from trainables.loop import fine_tune
    from trainables.models import save_weights

    cfg = _base_config(args, default=RunConfig().replace(**RECOMMENDED_TRAIN))
    out = _output(args) if args.output else None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--output {str(out)!r} is a file: give a folder")
    print(
        f"hesstune train: task {cfg.task.name}, model {cfg.model.name} ({cfg.model.pretrained}), "
        f"{cfg.epochs} epochs, regularizers: {_enabled(cfg) or 'none'}",
        flush=True,
    )
    epochs: list[dict[str, float]] = []
    result = None
    for result in fine_tune(cfg, log=lambda msg: print(msg, flush=True)):
        epochs.append(result.metrics)
        m = result.metrics
        print(
            f"epoch {result.epoch:3d}/{cfg.epochs}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.3f}  "
            f"val_acc {m.get('val_acc', math.nan):.3f}  test_acc {m['test_acc']:.3f}  ({m['epoch_s']:.2f} s)",
            flush=True,
        )
    assert result is not None
    final = result.metrics
    print(_final_table(final))
    used = result.records.get("transition", "none")
    error = f", largest entry error vs the injected F: {final['f_error']:.3f}" if "f_error" in final else ""
    print(f"noise matrix F: {used}{error}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        record = {"final": final, "epochs": epochs, "transition": used}
        (out / "metrics.json").write_text(json.dumps(record, indent=1))
        save_weights(result.state()["model"], out / "weights.safetensors")
        print(f"wrote {out / 'metrics.json'}, {out / 'weights.safetensors'}, {out / 'config.yaml'}")
    return 0


def _enabled(cfg: RunConfig) -> str:
    from trainables.regularizers import enabled_regularizers

    return ", ".join(enabled_regularizers(cfg))


def _final_table(m: dict[str, float]) -> str:
    rows = [f"  {k:<26} {m[k]:.6g}" for k in metrics.FINAL if k in m]
    return "final metrics:\n" + "\n".join(rows)


# -- sweep ---------------------------------------------------------------------------------------
def _sweep_options(args: argparse.Namespace) -> Any:
    return api.sweep_options(
        args.name,
        space=args.space or "full",
        trials=api.DEFAULT_TRIALS if args.trials is None else args.trials,
        objective=args.objective,
        output=_output(args),
        tracking_uri=args.tracking_uri,
        concurrency=args.concurrency,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        scheduler=args.scheduler,
        address=args.address,
        max_failures=args.max_failures,
        diagnostics_every=args.diagnostics_every,
        optuna_storage=args.optuna_storage or "",
        warm_start=args.warm_start or "",
        **_config_args(args),
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.register is not None:  # refused before the sweep runs, not after
        from tuning.export import check_registered_model_name

        check_registered_model_name(args.register)
    if args.tracking_wait < 0:
        raise UsageError(f"--tracking-wait {args.tracking_wait:g} must be ≥ 0 seconds")
    if args.resume:  # --trials above the sweep's total extends it
        done = api.open_sweep(args.resume, _output(args), flag="--resume").resume(
            args.trials, tracking_wait_s=args.tracking_wait
        )
    else:
        done = api.run(_sweep_options(args), tracking_wait_s=args.tracking_wait)  # validates first
    if not done.tracking_pending:  # else the store lacks some of the sweep, and the report reads it
        print()
        print(done.report())
    print(f"\nsweep wall time {done.wall_s:.0f} s; {done.errors} trial(s) failed")
    if done.tracking_pending:
        print(f"report, once the store has everything:  hesstune report {done.name} --output {done.output}")
        if args.register is not None:
            print(f"hesstune sweep: not registered: run `hesstune sync {done.name}` first", file=sys.stderr)
            return 1
        return 0
    if args.register is not None:
        _registered(args.register, done.register(args.register), done.parent_run_id)
    _where_to_look(done.tracking_uri, done.name, done.experiment_id, done.output)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    if args.wait < 0:
        raise UsageError(f"--wait {args.wait:g} must be ≥ 0 seconds")
    done = api.open_sweep(args.name, _output(args))
    sent = done.sync(wait_s=args.wait, log=lambda msg: print(msg, flush=True))
    print(f"sweep {done.name}: tracking is up to date in {done.tracking_uri} ({sent} writes sent now)")
    return 0


def _where_to_look(uri: str, name: str, exp_id: str, output: Path) -> None:
    ui = (
        f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        if uri.startswith("sqlite")
        else f"open {uri}"
    )
    print(f"compare the runs in MLflow:  {ui}  (experiment {name!r}, id {exp_id}: #/experiments/{exp_id}/runs)")
    print(f"report again:  hesstune report {name} --output {output}")
    print(f"best configs:  hesstune export {name} --top 3 -o best/ --output {output}")


# -- report / export --------------------------------------------------------------------------------
def _recorded_sweep(args: argparse.Namespace) -> api.Sweep:
    """The sweep named on the command line, read from ``--tracking-uri`` when given."""
    done = api.open_sweep(args.name, _output(args))
    return done.with_tracking_uri(_tracking_uri(args, done.output)) if args.tracking_uri else done


def cmd_report(args: argparse.Namespace) -> int:
    if args.criterion:
        _check_criterion(args.criterion)
    print(_recorded_sweep(args).report(args.criterion, top=args.top))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    folder = api.check_export(args.o, top=args.top, register=args.register)  # before the sweep is read
    done = _recorded_sweep(args)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    paths = done.export(
        folder, top=args.top, criterion=args.criterion, refit=args.refit, register=args.register, log=log
    )
    for path in paths:
        hint = {
            ".yaml": f"  (replay: hesstune train --config {path})",
            ".json": "  (model card: what was picked, why, how to load and use it)",
        }
        print(f"wrote {path}{hint.get(path.suffix, '')}")
    if not any(p.suffix == ".safetensors" for p in paths):
        print(f"no trial checkpoint under {done.folder}: configs only (replay them with hesstune train)")
    if args.register is not None:
        _registered(args.register, done.register(args.register, folder=folder, refit=args.refit), done.parent_run_id)
    return 0


def _registered(name: str, version: str, parent_id: str) -> None:
    print(
        f"registered {name} version {version} (alias champion) from rank 1, logged on the sweep's "
        f"parent run {parent_id}: mlflow.pytorch.load_model('models:/{name}@champion')"
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from tuning.export import load_model

    loaded = load_model(args.model, rank=args.rank, refit=args.refit)
    x = loaded.read_images(args.images)  # every image read before anything is printed
    for path, p in zip(args.images, loaded.predict(x), strict=True):
        print(f"{path}\t{p.name} (class {p.class_id})\t{p.probability:.4f}")
    return 0


def _check_criterion(name: str) -> None:
    from tuning import selection

    try:
        selection.get_criterion(name)
    except ValueError as exc:
        raise UsageError(f"--criterion {name}: {exc}") from None


# -- server --------------------------------------------------------------------------------------------
def cmd_server(args: argparse.Namespace) -> int:
    """Start a real MLflow tracking server (sqlite backend, local artifact root); ``--auth``: with
    MLflow's basic-auth app (docs: README, "On a Ray cluster")."""
    from tuning.tracking import server_auth_environment

    out = _output(args)
    auth_env = server_auth_environment(out, Path(args.auth_file) if args.auth_file else None) if args.auth else {}
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--backend-store-uri",
        f"sqlite:///{out / 'mlflow-server.db'}",
        "--artifacts-destination",
        str(out / "mlartifacts"),
        "--workers",
        str(args.workers),
        *(["--app-name", "basic-auth"] if args.auth else []),
    ]
    if args.host not in ("127.0.0.1", "localhost"):
        warning = (
            "basic auth sends passwords in the clear (no TLS): put the server behind an HTTPS proxy on "
            "untrusted networks"
            if args.auth
            else "the tracking server has no authentication: add --auth"
        )
        print(f"warning: binding to {args.host}: {warning}", file=sys.stderr)
    print("starting:", " ".join(cmd), flush=True)  # no credential is on the command line
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The GenAI job runner (7 huey consumers) is not used by hesstune and costs CPU on small machines.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.environ.update(auth_env)
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover


# -- parser ----------------------------------------------------------------------------------------------
def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="base run config (YAML); flags override it")
    p.add_argument(
        "--task",
        help="digits (built-in), fashion-mnist[:PATH] (default PATH: Debian's dataset-fashion-mnist), mnist:PATH, "
        "imagefolder:PATH, cifar10:PATH or cifar100:PATH (default digits)",
    )
    p.add_argument("--model", help="timm architecture name (default test_resnet)")
    p.add_argument(
        "--pretrained",
        help="source (pretrained once on the task's source classes, cached; the default), timm (local cache), "
        "none, or file:PATH",
    )
    p.add_argument(
        "--noise",
        help="injected label noise: none, symmetric:R, pair:R or correlated:R (default symmetric:0.4); --set "
        "task.noise.reveal=false makes the run use the noise matrix estimated from the data, as for real noise",
    )
    p.add_argument("--epochs", type=int, help="training epochs per run (default 10; train without --config: 30)")
    p.add_argument(
        "--seed",
        type=int,
        help="training seed: the new head's init, batch order, NSO's weight noise (default 0; the split and the "
        "label noise use task.split_seed)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config value, e.g. optim.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    from tuning import selection
    from tuning.sweep import DIAGNOSTICS_EVERY

    parser = argparse.ArgumentParser(prog="hesstune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sweep", help="search hyperparameters with Ray Tune + Optuna, tracked in MLflow")
    _add_run_options(s)
    s.add_argument(
        "--space", help="preset (regsl, robust, nso, full, groups, baseline, smoke) or a YAML file; default full"
    )
    s.add_argument(
        "--trials",
        type=int,
        help="trials to run in total (default 16); with --resume NAME, a number above the sweep's total "
        "extends it: more trials in the same Optuna study and MLflow parent run",
    )
    s.add_argument(
        "--concurrency", type=int, default=0, help="trials at once (default 0: as many as the resources allow)"
    )
    s.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs (and torch threads) per trial (default 1)")
    s.add_argument(
        "--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; fractions pack trials on one GPU (default 0)"
    )
    s.add_argument(
        "--scheduler", default="fifo", help="fifo (every trial runs all epochs, default) or asha (early stopping)"
    )
    s.add_argument(
        "--objective",
        default=selection.DEFAULT_CRITERION,
        help=(
            "what Optuna optimises: bound (default), measure, val_acc or val_loss, or several joined by commas "
            "(val_acc,bound) for a multi-objective search whose Pareto front the report shows (the pick is "
            "report/export's --criterion, which by default follows the noise case: docs/results.md)"
        ),
    )
    s.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="Optuna RDB for the sweep's study (sqlite:////abs/optuna.db, postgresql://…); default: the "
        "journal file optuna.journal in the sweep's folder",
    )
    s.add_argument(
        "--warm-start",
        metavar="NAME",
        help="try the best configs (up to 3, by the criterion its report selects with) of an earlier sweep "
        "in the same --output first (default: none)",
    )
    s.add_argument("--tracking-uri", help="sqlite:////abs/mlflow.db or http://HOST:PORT (default: sqlite in --output)")
    s.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help=f"folder for Ray results and the default MLflow store (default ./{DEFAULT_OUTPUT})",
    )
    s.add_argument("--name", help="sweep name (= MLflow experiment); default <task>-<space>-<time>")
    s.add_argument("--address", help="Ray cluster address (HOST:PORT or auto); default: a local Ray")
    s.add_argument(
        "--register",
        metavar="MODEL_NAME",
        help="at the end, register the pick (rank 1 by the recommended criterion) in the MLflow Model Registry "
        "as a new version of MODEL_NAME with the alias champion (default: none)",
    )
    s.add_argument(
        "--resume", metavar="NAME", help="continue an interrupted sweep (with --trials N: extend a finished one)"
    )
    s.add_argument("--max-failures", type=int, default=1, help="retries per trial from its last checkpoint (default 1)")
    s.add_argument(
        "--diagnostics-every",
        type=int,
        default=DIAGNOSTICS_EVERY,
        help=f"trace and λ_max (correlation-table diagnostics) in every N-th trial; M and B in all "
        f"(default {DIAGNOSTICS_EVERY}; 1: every trial)",
    )
    s.add_argument(
        "--tracking-wait",
        type=float,
        default=TRACKING_WAIT_S,
        metavar="S",
        help="at the end, wait up to S seconds for a tracking store that does not answer; what it still "
        f"lacks stays in the sweep's folder for `hesstune sync` (default {TRACKING_WAIT_S:g})",
    )
    s.set_defaults(func=cmd_sweep)

    y = sub.add_parser(
        "sync", help="send the tracking store what a sweep could not deliver (an outage, a killed driver)"
    )
    y.add_argument("name")
    y.add_argument("--output", default=DEFAULT_OUTPUT, help=f"the sweep's --output (default ./{DEFAULT_OUTPUT})")
    y.add_argument(
        "--wait",
        type=float,
        default=TRACKING_WAIT_S,
        metavar="S",
        help=f"give up after S seconds without an answer (default {TRACKING_WAIT_S:g})",
    )
    y.set_defaults(func=cmd_sync)

    for cmd, helptext in (
        ("report", "leaderboard and correlation table of a sweep"),
        ("export", "write the best trials' configs (replayable YAML), final weights (safetensors) and model cards"),
    ):
        p = sub.add_parser(cmd, help=helptext)
        p.add_argument("name")
        p.add_argument("--output", default=DEFAULT_OUTPUT, help=f"the sweep's --output (default ./{DEFAULT_OUTPUT})")
        p.add_argument("--tracking-uri", help="read the runs from this store instead of the sweep's own")
        p.add_argument(
            "--criterion",
            help="ranking criterion (default: val_acc when the trials' noise matrix looks symmetric, else "
            "val_band_bound; bound without a validation split)",
        )
        top = 10 if cmd == "report" else 1
        p.add_argument("--top", type=int, default=top, help=f"how many trials (default {top})")
        if cmd == "export":
            p.add_argument("-o", required=True, metavar="DIR", help="folder for 1.yaml, 2.yaml, …")
            p.add_argument(
                "--refit",
                action="store_true",
                help="train the chosen configs on train ∪ val here (r.refit.safetensors) and make r.yaml do so",
            )
            p.add_argument(
                "--register",
                metavar="MODEL_NAME",
                help="log the rank-1 model on the sweep's parent run and register it as a new version of "
                "MODEL_NAME in the MLflow Model Registry, alias champion (with --refit: the refit weights)",
            )
        p.set_defaults(func=cmd_report if cmd == "report" else cmd_export)

    r = sub.add_parser("predict", help="classify image files with an exported model (one line per image)")
    r.add_argument("--model", required=True, metavar="DIR", help="a folder written by hesstune export -o DIR")
    r.add_argument("--rank", type=int, default=1, help="which exported model (default 1)")
    r.add_argument("--refit", action="store_true", help="use its refit weights (export --refit)")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, …; grey or colour)")
    r.set_defaults(func=cmd_predict)

    t = sub.add_parser(
        "train",
        help="one fine-tuning run outside Ray, same metrics; without --config the recommended REGSL "
        "configuration (lr 1e-4, 30 epochs: docs/methods.md)",
    )
    _add_run_options(t)
    t.add_argument("--output", help="folder for metrics.json, weights.safetensors and config.yaml")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("server", help="start an MLflow tracking server (sqlite + artifact root)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    v.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    v.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"its sqlite store and artifacts (default ./{DEFAULT_OUTPUT})"
    )
    v.add_argument(
        "--auth",
        action="store_true",
        help="require a user and password (MLflow's basic-auth app): the admin's from MLFLOW_AUTH_ADMIN_USERNAME "
        "and MLFLOW_AUTH_ADMIN_PASSWORD, or from --auth-file (default: off)",
    )
    v.add_argument(
        "--auth-file",
        metavar="FILE",
        help="YAML with the admin's username and password, readable by you only (chmod 600); never put "
        "them on the command line",
    )
    v.set_defaults(func=cmd_server)
    return parser


def _process_environment() -> None:
    """Settings that must precede the first ``import ray`` / ``import mlflow``.

    Ray's ``uv run`` integration would otherwise upload the current directory (results folders
    included) as each worker's working_dir; workers run the installed package instead.
    """
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # against an http server MLflow prints "View run … / View experiment …" whenever a run ends, once
    # per trial, burying the progress lines; the sweep prints where to look at its end instead
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # export --register downloads a one-file model to check it: no progress bars among its lines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: Sequence[str] | None = None) -> int:
    _process_environment()
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except HesstuneError as exc:  # input a user can fix; anything else is a bug: its traceback shows
        print(f"hesstune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hesstune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
