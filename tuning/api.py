"""The Python API: run a sweep, read its trials, select, export and load the chosen model.

One entry point for notebooks and scripts; the ``hesstune`` CLI calls the same functions. A
walk-through from a sweep to predictions is ``docs/examples/sweep_to_predictions.py``::

    from tuning import api

    sweep = api.sweep(space="smoke", trials=4, epochs=2, noise="pair:0.4")
    sweep.trials()            # one row per finished trial (pandas)
    sweep.leaderboard()       # ranked by the criterion the report recommends
    sweep.export("best/")     # config, weights and model card of the pick

Errors a caller can fix raise :class:`trainables.errors.HesstuneError` subclasses with the
message the CLI would print.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from trainables.config import ConfigError, RunConfig, load_config
from trainables.errors import HesstuneError
from tuning import selection
from tuning.sweep import (
    DEFAULT_TRIALS,
    DIAGNOSTICS_EVERY,
    TRACKING_WAIT_S,
    SweepOptions,
    SweepPaths,
    SweepResult,
    extended,
    load_study,
    load_sweep,
    run_sweep,
)

__all__ = [
    "DEFAULT_OUTPUT",
    "DEFAULT_TRIALS",
    "Sweep",
    "UsageError",
    "base_config",
    "open_sweep",
    "sweep",
    "sweep_options",
]

DEFAULT_OUTPUT = "hesstune_runs"


def _quiet(_: str) -> None:
    """Progress lines nobody asked to see."""


class UsageError(HesstuneError):
    """Bad input to a command or API call; the message names the value and the fix."""


# -- configs -----------------------------------------------------------------------------------------
def parse_noise(text: str) -> dict[str, Any]:
    """``none``, ``symmetric:R``, ``pair:R`` or ``correlated:R`` as config overrides."""
    if text == "none":
        return {"task.noise.kind": "none", "task.noise.rate": 0.0}
    kind, _, rate = text.partition(":")
    if kind not in ("symmetric", "pair", "correlated") or not rate:
        raise UsageError(f"--noise {text!r}: use none, symmetric:R, pair:R or correlated:R (R in [0, 1))")
    try:
        value = float(rate)
    except ValueError:
        raise UsageError(f"--noise {text!r}: the rate {rate!r} is not a number") from None
    return {"task.noise.kind": kind, "task.noise.rate": value}


def _task_name(text: str) -> str:
    kind, sep, path = text.partition(":")
    return f"{kind}:{Path(path).expanduser().resolve()}" if sep and path else text


def base_config(
    config: str | Path | None = None,
    *,
    task: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    noise: str | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    default: RunConfig | None = None,
) -> RunConfig:
    """A run config: the YAML ``config`` (else ``default``, else the defaults), then the named
    settings, then ``overrides`` by dotted key (``{"optim.lr": 3e-4}``); checked."""
    base = load_config(config) if config else (default or RunConfig())
    flat: dict[str, Any] = {}
    for key, value in (("task.name", task and _task_name(task)), ("model.name", model)):
        if value:
            flat[key] = value
    if pretrained:
        flat["model.pretrained"] = pretrained
    if noise:
        flat.update(parse_noise(noise))
    for key, number in (("epochs", epochs), ("seed", seed)):
        if number is not None:
            flat[key] = number
    cfg = base.replace(**flat, **dict(overrides or {}))
    from trainables.data import parse_task_name
    from trainables.models import check_model_name

    parse_task_name(cfg.task.name)
    check_model_name(cfg.model.name)
    path = cfg.task.name.partition(":")[2]
    if path and not Path(path).is_dir():
        raise ConfigError(f"task folder {path!r} does not exist: give an existing local folder")
    return cfg


def sweep_options(
    name: str | None = None,
    *,
    space: str = "full",
    trials: int = DEFAULT_TRIALS,
    objective: str = selection.DEFAULT_CRITERION,
    output: str | Path = DEFAULT_OUTPUT,
    tracking_uri: str | None = None,
    concurrency: int = 0,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    scheduler: str = "fifo",
    address: str | None = None,
    max_failures: int = 1,
    diagnostics_every: int = DIAGNOSTICS_EVERY,
    optuna_storage: str = "",
    warm_start: str = "",
    base: RunConfig | None = None,
    **config: Any,
) -> SweepOptions:
    """A sweep's options, as ``hesstune sweep`` takes them; ``config`` are :func:`base_config`'s
    arguments (``task``, ``noise``, ``epochs``, ``overrides``, …) unless ``base`` is given."""
    from tuning.tracking import default_tracking_uri, validate_tracking_uri

    out = Path(output).expanduser().resolve()
    cfg = base if base is not None else base_config(**config)
    space_tag = Path(space).stem if space.endswith((".yaml", ".yml")) else space
    uri = validate_tracking_uri(tracking_uri or default_tracking_uri(out), multi_node=bool(address))
    return SweepOptions(
        name=name or f"{cfg.task.name.split(':')[0]}-{space_tag}-{time.strftime('%Y%m%d-%H%M%S')}",
        space=space,
        base=cfg,
        trials=trials,
        concurrency=concurrency,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        scheduler=scheduler,
        objective=objective,
        tracking_uri=uri,
        output=out,
        seed=int(config.get("seed") or 0),  # the sampler's seed is the training seed
        address=address,
        max_failures=max_failures,
        diagnostics_every=diagnostics_every,
        optuna_storage=optuna_storage,
        warm_start=warm_start,
    )


def check_export(folder: str | Path, *, top: int = 1, register: str | None = None) -> Path:
    """The export folder, resolved, once the input needing no sweep is checked: ``top``, a folder
    that is not a file, a model name MLflow accepts."""
    from tuning.export import check_registered_model_name

    if top < 1:
        raise UsageError(f"--top {top} must be ≥ 1")
    target = Path(folder).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise UsageError(f"-o {str(target)!r} is a file: give a folder")
    if register is not None:
        check_registered_model_name(register)
    return target


# -- sweeps --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sweep:
    """A sweep on disk (its Ray results, Optuna study and MLflow runs), found by name and output."""

    options: SweepOptions
    wall_s: float | None = None  # set when this process ran it
    errors: int = 0
    tracking_pending: int = 0  # writes its tracking store lacked when this process ran it (see sync)

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def output(self) -> Path:
        return self.options.output

    @property
    def tracking_uri(self) -> str:
        return self.options.tracking_uri

    @property
    def experiment_id(self) -> str:
        return str(self.options.extra["experiment_id"])

    @property
    def parent_run_id(self) -> str:
        return str(self.options.extra["parent_run_id"])

    @property
    def folder(self) -> Path:
        """The sweep's Ray experiment folder (metadata, Optuna journal, trial checkpoints)."""
        return SweepPaths(self.output, self.name).experiment

    def with_tracking_uri(self, uri: str) -> Sweep:
        """The same sweep read from another MLflow store (a copy, or a server it was synced to)."""
        return Sweep(SweepOptions(**{**self.options.__dict__, "tracking_uri": uri}), self.wall_s, self.errors)

    def resume(
        self, trials: int | None = None, *, tracking_wait_s: float = TRACKING_WAIT_S, log: Callable[[str], None] = print
    ) -> Sweep:
        """Finish an interrupted sweep; ``trials`` above its total extends it (same Optuna study,
        same MLflow parent run). Writes its tracking store missed go out first. Returns the sweep
        as it now is."""
        outcome = run_sweep(extended(self.options, trials), resume=True, tracking_wait_s=tracking_wait_s, log=log)
        return _ran(self.output, self.name, outcome)

    def sync(self, *, wait_s: float = TRACKING_WAIT_S, log: Callable[[str], None] = print) -> int:
        """Send the tracking store the writes it lacks (an outage that outlasted the sweep, a
        killed driver), in order, once; returns how many were sent. Raises
        :class:`~tuning.tracking.TrackingError` if the store does not answer within ``wait_s``."""
        from tuning.outbox import open_outbox
        from tuning.tracking import TrackingError, check_tracking_access

        check_tracking_access(self.tracking_uri)
        box = open_outbox(self.folder, self.tracking_uri, self.experiment_id, self.parent_run_id, log=log)
        pending = box.pending_writes()
        if pending:
            log(f"sending {pending} writes to {self.tracking_uri}")
        if not box.wait(wait_s):
            raise TrackingError(
                f"{self.tracking_uri} stopped answering; {box.pending_writes()} of {pending} writes still wait in "
                f"{box.path}: run `hesstune sync {self.name}` again when it answers"
            )
        return pending

    def trials(self) -> pd.DataFrame:
        """One row per trial that finished its budget: ``trial_id``, ``run_id``, final metrics,
        ``params`` (the trial's flat config) and the selection metrics."""
        from tuning.report import finished_trials

        return finished_trials(self.tracking_uri, self.experiment_id, self.parent_run_id)

    def criterion(self, criterion: str | None = None, *, table: pd.DataFrame | None = None) -> str:
        """``criterion`` checked, or the one the report recommends for these trials."""
        table = self.trials() if table is None else table
        if criterion is None:
            return selection.recommended_criterion(table)
        try:
            selection.get_criterion(criterion)
        except ValueError as exc:
            raise UsageError(f"--criterion {criterion}: {exc}") from None
        return criterion

    def leaderboard(self, criterion: str | None = None) -> pd.DataFrame:
        table = self.trials()
        return selection.leaderboard(table, self.criterion(criterion, table=table))

    def select(self, criterion: str | None = None) -> pd.Series:
        """The trial ``criterion`` picks (default: the recommended one), as a row of :meth:`trials`."""
        table = self._finished()
        trial_id = selection.select(table, self._for_selection(criterion, table))
        return table.set_index("trial_id").loc[trial_id]

    def report(self, criterion: str | None = None, *, top: int = 10) -> str:
        """The leaderboard, correlations and (two objectives) Pareto front, as ``hesstune report``."""
        from tuning.outbox import undelivered
        from tuning.report import format_report

        table = self.trials()
        waiting = undelivered(self.folder)
        note = (
            f"note: {waiting} writes of this sweep have not reached {self.tracking_uri} yet (it did not answer): "
            f"`hesstune sync {self.name}` sends them; until then this report lacks them\n\n"
            if waiting
            else ""
        )
        if table.empty:
            return note + "no trial finished: nothing to rank"
        return note + format_report(
            table, self.criterion(criterion, table=table), top=top, objective=self.options.objective
        )

    def study(self) -> Any:
        """The sweep's Optuna study (``optuna.Study``): every trial its searcher asked, all runs."""
        return load_study(self.output, self.name)

    def export(
        self,
        folder: str | Path,
        *,
        top: int = 1,
        criterion: str | None = None,
        refit: bool = False,
        register: str | None = None,
        log: Callable[[str], None] = _quiet,
    ) -> list[Path]:
        """Write the ``top`` trials by ``criterion`` (default: the recommended one): per rank r its
        config ``r.yaml``, final weights ``r.safetensors`` and model card ``r.card.json``
        (``hesstune export``); ``refit`` also trains each on train ∪ val (``r.refit.safetensors``).
        ``register``: the checks :meth:`register` needs are made before anything is written.
        Returns the paths written."""
        from tuning.export import export_configs, final_checkpoint

        target = check_export(folder, top=top, register=register)
        table = self._finished()
        chosen = self._for_selection(criterion, table)
        best = selection.rank(table, chosen)[0]
        if register is not None and not refit and final_checkpoint(self.folder, best) is None:
            raise UsageError(
                f"--register: the rank-1 trial {best} has no checkpoint under {self.folder} to register; "
                "add --refit to train and register its refit"
            )
        return export_configs(table, chosen, top, target, refit=refit, trials_dir=self.folder, sweep=self.name, log=log)

    def register(
        self,
        model_name: str,
        *,
        folder: str | Path | None = None,
        criterion: str | None = None,
        refit: bool = False,
        log: Callable[[str], None] = _quiet,
    ) -> str:
        """Register the pick (rank 1 by ``criterion``) in the MLflow Model Registry as a new version
        of ``model_name`` with the alias ``champion``, logged on the sweep's parent run, and return
        the version. ``folder``: an export of this sweep made by :meth:`export`; without one the
        pick is exported to a temporary folder first."""
        import tempfile

        from tuning.export import register_model

        if folder is not None:
            return register_model(self.tracking_uri, self.parent_run_id, folder, model_name, refit=refit)
        with tempfile.TemporaryDirectory() as tmp:
            self.export(tmp, criterion=criterion, refit=refit, register=model_name, log=log)
            return register_model(self.tracking_uri, self.parent_run_id, tmp, model_name, refit=refit)

    def _for_selection(self, criterion: str | None, table: pd.DataFrame) -> str:
        chosen = self.criterion(criterion, table=table)
        if selection.get_criterion(chosen).evaluation_only:
            raise UsageError(f"--criterion {chosen} uses clean test labels: it is for evaluation, not for a choice")
        return chosen

    def _finished(self) -> pd.DataFrame:
        table = self.trials()
        if table.empty:
            raise UsageError(f"sweep {self.name!r} has no finished trial to select from")
        return table


def sweep(
    name: str | None = None,
    *,
    tracking_wait_s: float = TRACKING_WAIT_S,
    log: Callable[[str], None] = print,
    **options: Any,
) -> Sweep:
    """Run a new sweep to completion (:func:`sweep_options` takes the options) and return it."""
    return run(sweep_options(name, **options), tracking_wait_s=tracking_wait_s, log=log)


def run(opts: SweepOptions, *, tracking_wait_s: float = TRACKING_WAIT_S, log: Callable[[str], None] = print) -> Sweep:
    """Run a new sweep given as :class:`SweepOptions` (validated first: bad input starts nothing)."""
    outcome = run_sweep(opts, tracking_wait_s=tracking_wait_s, log=log)
    return _ran(opts.output, opts.name, outcome)


def _ran(output: Path, name: str, outcome: SweepResult) -> Sweep:
    return Sweep(load_sweep(output, name), outcome.wall_s, outcome.errors, outcome.tracking_pending)


def open_sweep(name: str, output: str | Path = DEFAULT_OUTPUT, *, flag: str = "--name") -> Sweep:
    """A sweep that ran before, by its name and ``--output`` (``flag``: how the error names it)."""
    return Sweep(load_sweep(Path(output).expanduser().resolve(), name, flag=flag))
