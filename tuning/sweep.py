"""Launch (or resume) a sweep: Ray Tune trials, an Optuna searcher, MLflow tracking (docs/design.md).

The driver validates everything first, pretrains/caches the source model once, creates the
MLflow experiment and parent run, then runs the trials with :func:`trainables.trainable.run_trial`.
Sweep metadata lives in ``<output>/ray_results/<name>/hesstune_sweep.json`` so that
``--resume NAME``, ``report`` and ``export`` need nothing but the name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from search_spaces import SearchSpace, load_space
from trainables.config import RunConfig
from trainables.errors import HesstuneError
from trainables.metrics import OBJECTIVE_KEY
from tuning import selection
from tuning.tracking import ensure_parent_run, validate_tracking_uri

__all__ = ["SweepError", "SweepOptions", "SweepPaths", "SweepResult", "load_sweep", "run_sweep"]

META_FILE = "hesstune_sweep.json"
DIAGNOSTICS_EVERY = 12


class SweepError(HesstuneError):
    """A sweep cannot start as asked; the message says what to do."""


@dataclass(frozen=True)
class SweepOptions:
    name: str
    space: str
    base: RunConfig
    trials: int = 16
    concurrency: int = 0  # 0: as many as the resources allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    scheduler: str = "fifo"
    objective: str = selection.DEFAULT_CRITERION
    tracking_uri: str = ""
    output: Path = Path("hesstune_runs")
    seed: int = 0
    address: str | None = None
    max_failures: int = 1
    # trace and λ_max (diagnostics for the correlation table, not for selection) in every N-th
    # trial only: they cost more than M and B together (benchmarks/trial_profile.py, README)
    diagnostics_every: int = DIAGNOSTICS_EVERY
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["base"] = self.base.to_dict()
        data["output"] = str(self.output)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepOptions:
        data = dict(data)
        data["base"] = RunConfig.from_dict(data["base"])
        data["output"] = Path(data["output"])
        data.setdefault("diagnostics_every", 1)  # sweeps started before the option measured every trial
        return cls(**data)


@dataclass(frozen=True)
class SweepPaths:
    output: Path
    name: str

    @property
    def storage(self) -> Path:
        return self.output / "ray_results"

    @property
    def experiment(self) -> Path:
        return self.storage / self.name

    @property
    def meta(self) -> Path:
        return self.experiment / META_FILE


# Criteria whose metric every trial reports, so Optuna can optimise it (the study's extra
# criteria are computed after the fact over a whole search; use them with ``report --criterion``).
SWEEP_OBJECTIVES = selection.per_trial_criteria()


def objective_metric(objective: str) -> tuple[str, str]:
    """(metric, mode) of a selection criterion usable as the search objective."""
    try:
        crit = selection.get_criterion(objective)
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    if crit.evaluation_only:
        raise SweepError(
            f"--objective {objective} uses the clean test labels (evaluation only): use bound, measure or val_acc"
        )
    if objective not in SWEEP_OBJECTIVES:
        raise SweepError(f"--objective {objective} is not reported by trials: use one of {', '.join(SWEEP_OBJECTIVES)}")
    return crit.metric, crit.direction


def validate_options(opts: SweepOptions, *, resume: bool = False) -> SearchSpace:
    """Every check that can fail, before anything is started or written."""
    if opts.trials < 1:
        raise SweepError(f"--trials {opts.trials} must be ≥ 1")
    if opts.cpus_per_trial <= 0 or opts.gpus_per_trial < 0:
        raise SweepError("--cpus-per-trial must be > 0 and --gpus-per-trial ≥ 0")
    if str(opts.base.device).startswith("cuda") and opts.gpus_per_trial == 0:
        raise SweepError(
            f"device={opts.base.device!r} but --gpus-per-trial is 0, so Ray gives trials no GPU: pass "
            "--gpus-per-trial 1 (or a fraction such as 0.5), or use device=auto"
        )
    if opts.concurrency < 0:
        raise SweepError(f"--concurrency {opts.concurrency} must be ≥ 0 (0: as many as fit)")
    if opts.scheduler not in ("fifo", "asha"):
        raise SweepError(f"--scheduler {opts.scheduler!r} is unknown: use fifo or asha")
    if opts.max_failures < 0:
        raise SweepError(f"--max-failures {opts.max_failures} must be ≥ 0")
    if opts.diagnostics_every < 1:
        raise SweepError(
            f"--diagnostics-every {opts.diagnostics_every} must be ≥ 1 (1: trace and λ_max in every trial)"
        )
    objective_metric(opts.objective)
    validate_tracking_uri(opts.tracking_uri)  # sqlite on several nodes is refused by the preflight
    space = load_space(opts.space)
    space.check(opts.base)
    check_storage(opts.output)
    paths = SweepPaths(opts.output, opts.name)
    if not resume and paths.experiment.exists():
        raise SweepError(
            f"sweep {opts.name!r} already exists in {paths.storage}: use --resume {opts.name} or another --name"
        )
    return space


def check_storage(output: Path) -> None:
    """The output folder must be a folder we can create or write, checked without creating it."""
    if output.exists() and not output.is_dir():
        raise SweepError(f"--output {str(output)!r} is a file: give a folder")
    ancestor = output
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SweepError(f"--output {str(output)!r} cannot be created or written ({str(ancestor)!r} is not writable)")


def load_sweep(output: Path, name: str) -> SweepOptions:
    meta = SweepPaths(output, name).meta
    if not meta.is_file():
        raise SweepError(f"no sweep named {name!r} in {output.resolve() / 'ray_results'}: check --name/--output")
    return SweepOptions.from_json(json.loads(meta.read_text()))


# -- Ray ---------------------------------------------------------------------------------------
def _init_ray(opts: SweepOptions) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 asks for it explicitly; a user's setting wins
    env = {
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    for key in ("HESSTUNE_CACHE", "HESSTUNE_FAULT", "HESSTUNE_FAULT_DIR", "HF_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own progress lines instead of Ray's tables
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "logging_level": "ERROR"}
    if opts.address:
        if opts.address.startswith(("127.", "localhost")):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a loopback cluster: stay on loopback
        ray.init(address=opts.address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **kwargs)


def check_trial_resources(opts: SweepOptions, log: Callable[[str], None] = print) -> None:
    """One trial must fit the Ray cluster's resources, or its trials wait forever. On this machine
    that is an error; a cluster (``--address``) may grow through its autoscaler, so there it is a
    warning."""
    import ray

    total = ray.cluster_resources()
    where = f"at {opts.address}" if opts.address else "on this machine"
    for flag, asked, kind in (
        ("--gpus-per-trial", opts.gpus_per_trial, "GPU"),
        ("--cpus-per-trial", opts.cpus_per_trial, "CPU"),
    ):
        has = float(total.get(kind, 0.0))
        if asked > has:
            no_gpu = kind == "GPU" and has == 0
            fix = "--gpus-per-trial 0 (CPU) or a Ray cluster with GPUs (--address)" if no_gpu else f"{flag} ≤ {has:g}"
            message = f"{flag} {asked:g} but the Ray cluster {where} has {has:g} {kind}(s)"
            if not opts.address:
                raise SweepError(f"{message}: use {fix}")
            log(f"warning: {message} now: trials wait until its autoscaler adds them (else use {fix})")


def _searcher(space: SearchSpace, opts: SweepOptions, mode: str) -> Any:
    from tuning.search import FidelityAwareOptunaSearch

    return FidelityAwareOptunaSearch(
        space=space.bind(opts.base),
        metric=OBJECTIVE_KEY,
        mode=mode,
        seed=opts.seed,
        max_epochs=space.epochs_for(opts.base),
    )


def _scheduler(opts: SweepOptions, epochs: int) -> Any:
    if opts.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration", max_t=epochs, grace_period=max(1, epochs // 4), reduction_factor=3
    )


def _base_for(opts: SweepOptions, metric: str) -> RunConfig:
    """The trials' base config: torch threads = CPUs per trial (recorded, so exports replay
    exactly); with ASHA and a Hessian objective, M and B are measured every epoch."""
    base = opts.base.replace(threads=max(1, int(opts.cpus_per_trial)))
    if opts.scheduler == "asha" and metric in ("bound", "measure"):
        base = base.replace(**{"measure.every": 1})
    return base


def _tuner(opts: SweepOptions, space: SearchSpace, callbacks: list[Any], paths: SweepPaths) -> Any:
    from ray import tune

    from trainables.trainable import run_trial

    metric, mode = objective_metric(opts.objective)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, objective=metric, gpu_fraction=opts.gpus_per_trial, diagnostics_every=opts.diagnostics_every
        ),
        {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
    )
    if paths.experiment.exists() and tune.Tuner.can_restore(str(paths.experiment)):
        return tune.Tuner.restore(
            str(paths.experiment), trainable=trainable, resume_unfinished=True, resume_errored=False
        )
    epochs = space.epochs_for(opts.base)
    tune_config = tune.TuneConfig(
        search_alg=_searcher(space, opts, mode),
        scheduler=_scheduler(opts, epochs),
        metric=OBJECTIVE_KEY,
        mode=mode,
        num_samples=opts.trials,
        max_concurrent_trials=opts.concurrency or None,
        reuse_actors=True,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
    run_config = tune.RunConfig(
        name=opts.name,
        storage_path=str(paths.storage),
        verbose=0,
        callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


@dataclass(frozen=True)
class SweepResult:
    """Where a finished sweep's results are: MLflow ids, Ray's ResultGrid, the paths, its wall time."""

    experiment_id: str
    parent_run_id: str
    results: Any  # ray.tune.ResultGrid
    paths: SweepPaths
    wall_s: float
    errors: int  # trials that ended in error


def run_sweep(opts: SweepOptions, *, resume: bool = False, log: Callable[[str], None] = print) -> SweepResult:
    """Validate ``opts`` (:func:`validate_options`, nothing is started before), then run the sweep
    to completion."""
    from tuning.callbacks import ProgressCallback, TrackingCallback

    space = validate_options(opts, resume=resume)
    paths = SweepPaths(opts.output.resolve(), opts.name)
    metric, _ = objective_metric(opts.objective)
    opts = SweepOptions(**{**opts.__dict__, "base": _base_for(opts, metric), "output": paths.output})
    from trainables.data import load_task

    load_task(opts.base.task)  # bad data is one error here, not a failure in every trial
    if opts.base.model.pretrained == "source":
        from trainables.models import ensure_source_model

        ensure_source_model(opts.base.model.name, opts.base.task, log=log)
    _init_ray(opts)
    check_trial_resources(opts, log)
    if opts.address:
        from tuning.cluster import preflight

        log(f"preflight: storage and tracking checked on {preflight(paths.storage, opts.tracking_uri)} node(s)")
    paths.output.mkdir(parents=True, exist_ok=True)
    exp_id, parent_id = ensure_parent_run(
        opts.tracking_uri,
        opts.name,
        tags=_sweep_tags(opts),
        params=_sweep_params(opts, space),
        artifacts=paths.output / "mlartifacts",  # everything a sweep writes stays under --output
    )
    paths.experiment.mkdir(parents=True, exist_ok=True)
    meta = {**opts.to_json(), "extra": {"experiment_id": exp_id, "parent_run_id": parent_id}}
    paths.meta.write_text(json.dumps(meta, indent=1))
    tracker = TrackingCallback(opts.tracking_uri, exp_id, parent_id, sweep=opts.name)
    progress = ProgressCallback(opts.trials, metric, epochs=space.epochs_for(opts.base), log=log)
    tic = time.perf_counter()
    log(
        f"sweep {opts.name}: {opts.trials} trials of space {space.name!r}, objective {opts.objective}, "
        f"results in {paths.experiment}"
    )
    # A restored tuner brings back its own (pickled) callbacks; ``finish`` reads MLflow, so any
    # instance of the tracker can close the sweep.
    results = _tuner(opts, space, [tracker, progress], paths).fit()
    tracker.finish(wall_s=time.perf_counter() - tic)
    return SweepResult(exp_id, parent_id, results, paths, time.perf_counter() - tic, len(results.errors))


def _sweep_tags(opts: SweepOptions) -> dict[str, str]:
    import optuna
    import ray
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return {
        "hesstune.space": opts.space,
        "hesstune.objective": opts.objective,
        "versions.ray": ray.__version__,
        "versions.optuna": optuna.__version__,
        "versions.torch": torch.__version__,
        "sampler": f"TPESampler(seed={opts.seed})",
    }


def _sweep_params(opts: SweepOptions, space: SearchSpace) -> dict[str, Any]:
    params = {f"base.{k}": v for k, v in opts.base.to_flat().items()}
    params.update(
        {
            "space": space.name,
            "trials": opts.trials,
            "objective": opts.objective,
            "scheduler": opts.scheduler,
            "seed": opts.seed,
            "concurrency": opts.concurrency,
            "cpus_per_trial": opts.cpus_per_trial,
            "gpus_per_trial": opts.gpus_per_trial,
            "diagnostics_every": opts.diagnostics_every,
        }
    )
    return params
