"""Launch (or resume) a sweep: Ray Tune trials, an Optuna searcher, MLflow tracking (docs/design.md).

The driver validates everything first, pretrains/caches the source model once, creates the
MLflow experiment and parent run, then runs the trials with :func:`trainables.trainable.run_trial`.
Sweep metadata lives in ``<output>/ray_results/<name>/hesstune_sweep.json`` so that
``--resume NAME``, ``report`` and ``export`` need nothing but the name. The Optuna study lives
beside it (``optuna.journal``, or the RDB of ``--optuna-storage``), so ``optuna.load_study`` and
optuna-dashboard open it, and ``--resume NAME --trials N`` extends a finished sweep: each
extension is one more Ray experiment (``extend-1``, … inside the sweep's folder) that asks the same
study and logs under the same MLflow parent run.
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
from tuning.outbox import Outbox, open_outbox
from tuning.tracking import check_tracking_access, ensure_parent_run, validate_tracking_uri

__all__ = ["SweepError", "SweepOptions", "SweepPaths", "SweepResult", "load_sweep", "run_sweep"]

META_FILE = "hesstune_sweep.json"
JOURNAL_FILE = "optuna.journal"
DIAGNOSTICS_EVERY = 12
WARM_START_POINTS = 3  # --warm-start: the earlier sweep's best configs tried first
DEFAULT_TRIALS = 16
TRACKING_WAIT_S = 60.0  # at the end of a sweep, how long to wait for a tracking store that does not answer


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
    optuna_storage: str = ""  # an Optuna RDB URL; "": a JournalStorage file in the sweep's folder
    warm_start: str = ""  # a finished sweep whose best configs the searcher tries first
    # trials per Ray experiment: the first run, then each extension (--resume NAME --trials N)
    segments: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trial_segments(self) -> tuple[int, ...]:
        return self.segments or (self.trials,)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["base"] = self.base.to_dict()
        data["output"] = str(self.output)
        data["segments"] = list(self.trial_segments)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepOptions:
        data = dict(data)
        data["base"] = RunConfig.from_dict(data["base"])
        data["output"] = Path(data["output"])
        data.setdefault("diagnostics_every", 1)  # sweeps started before the option measured every trial
        data["segments"] = tuple(data.get("segments") or (data["trials"],))
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

    @property
    def journal(self) -> Path:
        return self.experiment / JOURNAL_FILE

    def segment(self, index: int) -> Path:
        """The Ray experiment folder of the first run (0) or of extension ``index``."""
        return self.experiment if index == 0 else self.experiment / f"extend-{index}"


# Criteria whose metric every trial reports, so Optuna can optimise it (the study's extra
# criteria are computed after the fact over a whole search; use them with ``report --criterion``).
SWEEP_OBJECTIVES = selection.per_trial_criteria()


def objective_metrics(objective: str) -> list[tuple[str, str]]:
    """(metric, mode) of each criterion of ``objective``: one name, or several joined by commas for
    a multi-objective search (``val_acc,bound``). The first is the primary: the metric trials
    report as ``objective``, and the one ASHA stops trials by."""
    names = [n.strip() for n in objective.split(",")]
    if len(set(names)) < len(names) or "" in names:
        raise SweepError(f"--objective {objective!r}: name each criterion once, e.g. val_acc,bound")
    pairs: list[tuple[str, str]] = []
    for name in names:
        try:
            crit = selection.get_criterion(name)
        except ValueError as exc:
            raise SweepError(f"--objective {objective}: {exc}") from None
        if crit.evaluation_only:
            raise SweepError(
                f"--objective {objective}: {name} uses the clean test labels (evaluation only): "
                f"use {', '.join(SWEEP_OBJECTIVES)}"
            )
        if name not in SWEEP_OBJECTIVES:
            raise SweepError(
                f"--objective {objective}: {name} is not reported by trials: use {', '.join(SWEEP_OBJECTIVES)}"
            )
        pairs.append((crit.metric, crit.direction))
    return pairs


def objective_metric(objective: str) -> tuple[str, str]:
    """(metric, mode) of the primary criterion of the search objective."""
    return objective_metrics(objective)[0]


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
    check_optuna_storage(opts.optuna_storage)
    space = load_space(opts.space)
    space.check(opts.base)
    check_storage(opts.output)
    paths = SweepPaths(opts.output, opts.name)
    if not resume and paths.experiment.exists():
        raise SweepError(
            f"sweep {opts.name!r} already exists in {paths.storage}: use --resume {opts.name} or another --name"
        )
    if opts.warm_start and not resume:
        load_sweep(opts.output, opts.warm_start, flag="--warm-start")
    check_tracking_access(opts.tracking_uri)  # a server that is down or wants credentials: one line
    if not opts.address:  # what the local Ray would have, known before starting it
        import torch

        check_trial_resources(opts, total={"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())})
    return space


OPTUNA_RDB_SCHEMES = ("sqlite:///", "postgresql", "mysql")


def check_optuna_storage(url: str) -> None:
    if url and not url.startswith(OPTUNA_RDB_SCHEMES):
        raise SweepError(
            f"--optuna-storage {url!r} is not an Optuna RDB URL: use sqlite:////abs/optuna.db, "
            "postgresql://… or mysql://… (default: a journal file in the sweep's folder)"
        )


def study_storage(opts: SweepOptions) -> Any:
    """The sweep's Optuna storage: the RDB of ``--optuna-storage``, else a JournalStorage file in
    the sweep's folder. ``optuna.load_study(study_name=NAME, storage=...)`` opens the study."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if opts.optuna_storage:
        return optuna.storages.RDBStorage(opts.optuna_storage)
    path = SweepPaths(opts.output.resolve(), opts.name).journal
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def load_study(output: Path, name: str) -> Any:
    """The Optuna study of sweep ``name`` (every trial its searcher asked, in all its runs)."""
    import optuna

    opts = load_sweep(output, name)
    return optuna.load_study(study_name=opts.name, storage=study_storage(opts))


def check_storage(output: Path) -> None:
    """The output folder must be a folder we can create or write, checked without creating it."""
    if output.exists() and not output.is_dir():
        raise SweepError(f"--output {str(output)!r} is a file: give a folder")
    ancestor = output
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SweepError(f"--output {str(output)!r} cannot be created or written ({str(ancestor)!r} is not writable)")


def load_sweep(output: Path, name: str, *, flag: str = "--name") -> SweepOptions:
    meta = SweepPaths(output, name).meta
    if not meta.is_file():
        raise SweepError(f"no sweep named {name!r} in {output.resolve() / 'ray_results'}: check {flag}/--output")
    return SweepOptions.from_json(json.loads(meta.read_text()))


def extended(opts: SweepOptions, trials: int | None) -> SweepOptions:
    """``opts`` of a sweep being resumed, with ``trials`` in total: more than it has adds an
    extension (a Ray experiment of the difference) to its segments; fewer is refused."""
    if trials is None or trials == opts.trials:
        return opts
    if trials < opts.trials:
        raise SweepError(
            f"--trials {trials} is below the {opts.trials} trials sweep {opts.name!r} already has: "
            f"give more than {opts.trials} to extend it, or leave --trials out to resume it"
        )
    if not opts.optuna_storage and not SweepPaths(opts.output, opts.name).journal.exists():
        raise SweepError(
            f"sweep {opts.name!r} kept its Optuna study in memory (it predates persisted studies): "
            f"it can be resumed but not extended; start a new sweep with --warm-start {opts.name}"
        )
    segments = (*opts.trial_segments, trials - opts.trials)
    return SweepOptions(**{**opts.__dict__, "trials": trials, "segments": segments})


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
        # "local": a new Ray instance, never one that `ray start` left running on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **kwargs)


def check_trial_resources(
    opts: SweepOptions, log: Callable[[str], None] = print, total: dict[str, float] | None = None
) -> None:
    """One trial must fit the Ray cluster's resources (``total``, default: Ray's count), or its
    trials wait forever. On this machine that is an error; a cluster (``--address``) may grow
    through its autoscaler, so there it is a warning."""
    if total is None:
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


def _searcher(space: SearchSpace, opts: SweepOptions, segment: int) -> Any:
    """Optuna's TPE over the sweep's persistent study. An extension (``segment`` > 0) loads the
    study with all earlier trials and seeds its sampler apart, so it does not redraw the first
    run's random start-up configs."""
    from tuning.search import FidelityAwareOptunaSearch

    pairs = objective_metrics(opts.objective)
    metric: str | list[str] = OBJECTIVE_KEY if len(pairs) == 1 else [m for m, _ in pairs]
    mode: str | list[str] = pairs[0][1] if len(pairs) == 1 else [d for _, d in pairs]
    points = warm_start_points(opts, space) if segment == 0 and opts.warm_start else None
    return FidelityAwareOptunaSearch(
        space=space.bind(opts.base),
        metric=metric,
        mode=mode,
        seed=opts.seed + 1000 * segment,
        study_name=opts.name,
        storage=study_storage(opts),
        points_to_evaluate=points,
        max_epochs=space.epochs_for(opts.base),
        metric_names=[m for m, _ in pairs],
    )


def warm_start_points(opts: SweepOptions, space: SearchSpace) -> list[dict[str, Any]]:
    """The searched values of the ``--warm-start`` sweep's best trials (up to 3 of those ranked by
    the criterion its report selects with: val_band_bound ranks only the trials inside its
    validation band), best first, as points this sweep's searcher tries first. A value this
    space cannot take is left out of its point, and Optuna samples it instead
    (:meth:`SearchSpace.default_point`)."""
    from tuning.report import config_from_params, finished_trials

    earlier = load_sweep(opts.output, opts.warm_start, flag="--warm-start")
    table = finished_trials(earlier.tracking_uri, earlier.extra["experiment_id"], earlier.extra["parent_run_id"])
    if table.empty:
        raise SweepError(f"--warm-start {opts.warm_start}: that sweep has no finished trial to start from")
    criterion = selection.recommended_criterion(table)
    by_id = {row["trial_id"]: row for _, row in table.iterrows()}
    best = selection.rank(table, criterion)[: min(WARM_START_POINTS, opts.trials)]
    return [space.default_point(config_from_params(by_id[t]["params"])) for t in best]


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


def _tuner(opts: SweepOptions, space: SearchSpace, callbacks: list[Any], paths: SweepPaths, segment: int) -> Any:
    """The Ray Tuner of run ``segment`` of the sweep: restored from its folder when Ray saved it
    there (a killed or finished run), else new, with that run's number of trials."""
    from ray import tune

    from trainables.trainable import run_trial

    pairs = objective_metrics(opts.objective)
    metric, mode = pairs[0]
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            objective=metric,
            gpu_fraction=opts.gpus_per_trial,
            diagnostics_every=opts.diagnostics_every,
            searched=tuple(m for m, _ in pairs) if len(pairs) > 1 else (),
        ),
        {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
    )
    folder = paths.segment(segment)
    if folder.exists() and tune.Tuner.can_restore(str(folder)):
        return tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=False)
    epochs = space.epochs_for(opts.base)
    tune_config = tune.TuneConfig(
        search_alg=_searcher(space, opts, segment),
        scheduler=_scheduler(opts, epochs),
        metric=OBJECTIVE_KEY,
        mode=mode,
        num_samples=opts.trial_segments[segment],
        max_concurrent_trials=opts.concurrency or None,
        reuse_actors=True,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
    run_config = tune.RunConfig(
        name=folder.name,
        storage_path=str(folder.parent),
        verbose=0,
        callbacks=callbacks,
        # two per trial: a damaged newest checkpoint falls back to the one before (trainables.trainable)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
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
    results: Any  # ray.tune.ResultGrid of the sweep's last run (the first, or its last extension)
    paths: SweepPaths
    wall_s: float
    errors: int  # trials that ended in error, in all runs
    tracking_pending: int = 0  # writes the tracking store did not have when the sweep ended


def run_sweep(
    opts: SweepOptions,
    *,
    resume: bool = False,
    tracking_wait_s: float = TRACKING_WAIT_S,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Validate ``opts`` (:func:`validate_options`, nothing is started before), then run the sweep
    to completion: every run of it in order (:attr:`SweepOptions.segments`); a run Ray has
    finished returns at once, an interrupted one resumes, a new extension starts. At the end,
    wait up to ``tracking_wait_s`` for the tracking store to have every write (:mod:`tuning.outbox`)."""
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
    _fail_fast_tracking()
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
    opts = SweepOptions(**{**opts.__dict__, "extra": {"experiment_id": exp_id, "parent_run_id": parent_id}})
    _write_meta(paths, opts)  # before any trial: a killed driver resumes with what it was asked
    outbox = open_outbox(paths.experiment, opts.tracking_uri, exp_id, parent_id, log=log)  # writes left by a killed
    # driver go out first
    tracker = TrackingCallback(
        opts.tracking_uri, exp_id, parent_id, sweep=opts.name, folder=paths.experiment, objectives=opts.objective
    )
    tic = time.perf_counter()
    log(
        f"sweep {opts.name}: {opts.trials} trials of space {space.name!r}, objective {opts.objective}, "
        f"results in {paths.experiment}"
    )
    errors, results = 0, None
    segments = opts.trial_segments
    for segment, count in enumerate(segments):
        if segment and not paths.segment(segment).exists():
            log(f"extending sweep {opts.name}: {count} more trial(s), {opts.trials} in total")
        before = sum(segments[:segment])
        progress = ProgressCallback(count, metric, epochs=space.epochs_for(opts.base), log=log, offset=before)
        # A restored tuner brings back its own (pickled) callbacks; ``finish`` reads MLflow, so any
        # instance of the tracker can close the sweep.
        results = _tuner(opts, space, [tracker, progress], paths, segment).fit()
        errors += len(results.errors)
    _close_study(opts)
    tracker.finish(wall_s=time.perf_counter() - tic)
    pending = report_tracking(outbox, opts.name, opts.output, tracking_wait_s, log)
    return SweepResult(exp_id, parent_id, results, paths, time.perf_counter() - tic, errors, pending)


def report_tracking(outbox: Outbox, name: str, output: Path, wait_s: float, log: Callable[[str], None]) -> int:
    """Wait up to ``wait_s`` for the outbox to deliver everything, then say how tracking went:
    how long it was behind, or what is still waiting and how to send it. Returns the writes
    still waiting."""
    if not outbox.wait(wait_s):
        pending = outbox.pending_writes()
        log(
            f"tracking: {outbox.uri} has not answered for {outbox.behind_for():.0f} s; {pending} writes wait in "
            f"{outbox.path}. Nothing is lost: `hesstune sync {name} --output {output}` sends them "
            "once it answers (so does --resume)"
        )
        return pending
    if outbox.outages:
        log(
            f"tracking: behind for {outbox.behind_s:.0f} s in {outbox.outages} outage(s) of {outbox.uri}; "
            f"{outbox.late} writes were sent late, none lost"
        )
    return 0


def _fail_fast_tracking() -> None:
    """MLflow's client retries a request that gets no answer for about 4 minutes before it
    raises (120 s per attempt when the network drops packets): the outbox retries for ever
    anyway, so in the driver a request gives up within seconds and the outbox notices an outage,
    and its end, soon. A user's own settings win."""
    for key, value in (
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
    ):
        os.environ.setdefault(key, value)


def _write_meta(paths: SweepPaths, opts: SweepOptions) -> None:
    """The sweep's options, written whole or not at all (a rename is atomic)."""
    tmp = paths.meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(opts.to_json(), indent=1))
    tmp.replace(paths.meta)


def _close_study(opts: SweepOptions) -> None:
    """Mark FAIL the study's trials still RUNNING once every Ray trial has ended: trials the
    searcher asked for before a killed driver last saved its state, which the resumed sweep
    replaced (docs/design.md)."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=opts.name, storage=study_storage(opts))
    except KeyError:  # a sweep started before studies were persisted kept its study in memory
        return
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)


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
