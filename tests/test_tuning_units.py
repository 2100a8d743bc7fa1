"""Units of the tuning layer that need no running Ray: fidelity-aware Optuna telling, OOM naming,
tracking-URI rules, config round trips through MLflow params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from trainables.config import RunConfig
from tuning.report import config_from_params
from tuning.tracking import TrackingError, validate_tracking_uri


def _searcher(max_epochs: int = 5):  # type: ignore[no-untyped-def]
    from tuning.search import FidelityAwareOptunaSearch

    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)

    searcher = FidelityAwareOptunaSearch(space=space, metric="objective", mode="min", seed=0, max_epochs=max_epochs)
    return searcher


def test_trials_stopped_before_the_last_epoch_are_told_pruned() -> None:
    searcher = _searcher()
    assert searcher.suggest("early") is not None and searcher.suggest("full") is not None
    searcher.on_trial_result("early", {"objective": 1.0, "training_iteration": 1, "epoch": 1})
    searcher.on_trial_complete("early", result={"objective": 1.0, "epoch": 2, "training_iteration": 2})
    searcher.on_trial_complete("full", result={"objective": 0.5, "epoch": 5, "training_iteration": 5})
    states = {t.number: t.state for t in searcher._ot_study.trials}
    assert states == {0: optuna.trial.TrialState.PRUNED, 1: optuna.trial.TrialState.COMPLETE}
    assert searcher._ot_study.best_value == 0.5


def test_failed_trials_are_not_told_pruned() -> None:
    searcher = _searcher()
    searcher.suggest("broken")
    searcher.on_trial_complete("broken", result=None, error=True)
    assert searcher._ot_study.trials[0].state == optuna.trial.TrialState.FAIL


def test_cuda_oom_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import trainables.trainable as trainable

    def boom(*_: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainable, "_run", boom)
    with pytest.raises(trainable.TrialOutOfMemoryError, match=r"raise --gpus-per-trial or lower optim\.batch_size"):
        trainable.run_trial({}, gpu_fraction=0.25)


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("sqlite:////abs/mlflow.db", True),
        ("http://127.0.0.1:5000", True),
        ("https://mlflow.example:443", True),
        ("sqlite:///relative.db", False),
        ("file:///tmp/mlruns", False),
        ("./mlruns", False),
        ("http://", False),
        ("postgresql://u@h/db", False),
    ],
)
def test_tracking_uri_rules(uri: str, ok: bool) -> None:
    if ok:
        assert validate_tracking_uri(uri) == uri
    else:
        with pytest.raises(TrackingError):
            validate_tracking_uri(uri)


def test_sqlite_refused_for_several_nodes() -> None:
    with pytest.raises(TrackingError, match="hesstune server"):
        validate_tracking_uri("sqlite:////abs/mlflow.db", multi_node=True)


def test_config_survives_the_mlflow_param_round_trip() -> None:
    cfg = RunConfig().replace(
        **{
            "optim.lr": 3.3e-4,
            "constraint.enabled": True,
            "constraint.group_scales": [1.0, 2.5],
            "measure.loss_bound": None,
            "task.name": "imagefolder:/data/x y",
            "threads": 1,
        }
    )
    params = {k: str(v) for k, v in cfg.to_flat().items()}  # what MLflow stores
    assert config_from_params(params) == cfg


def test_trial_metrics_sort_headline_first_in_mlflow_and_read_back_unchanged() -> None:
    """MLflow's compare view sorts keys by code point: the headline block must come first and
    contiguous, every other key must sort after it, and the names must round-trip."""
    from tuning.tracking import HEADLINE_METRICS, metric_name, mlflow_key

    reported = [*HEADLINE_METRICS, "epoch", "objective", "h/layer1.0.conv1.weight", "dist/g0", "bound_C", "acc_gap"]
    names = sorted(mlflow_key(k) for k in reported)
    assert names[: len(HEADLINE_METRICS)] == sorted(HEADLINE_METRICS)
    assert all(n.startswith("xtra/") for n in names[len(HEADLINE_METRICS) :])
    assert sorted(metric_name(n) for n in names) == sorted(reported)


def test_report_says_why_correlations_are_nan_with_fewer_than_three_trials() -> None:
    import pandas as pd

    from tuning.report import format_report

    rows = [
        {
            "trial_id": f"t{i}",
            "bound": 1.0 + i,
            "measure": 0.1 * i,
            "gap": 0.2 + 0.1 * i**2,
            "val_acc": 0.5,
            "test_acc": 0.7 - 0.1 * i,
        }
        for i in range(3)
    ]
    note = "(NaN where n < 3"
    assert note in format_report(pd.DataFrame(rows[:2]), "bound")
    text = format_report(pd.DataFrame(rows), "bound")
    rows_after = text.split("Correlation with the true test gap")[1].splitlines()
    assert note not in text and next(r for r in rows_after if r.startswith("measure")).split()[1:] == [
        "1.000",
        "1.000",
        "0.961",
        "3",
    ]  # gap = 0.2 + 10·measure²: monotone, not linear


def test_long_texts_survive_mlflow_tags_in_chunks(tmp_path: Path) -> None:
    import mlflow

    from tuning.tracking import client, set_text_tags, text_from_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mc = client(uri)
    run_id = mc.create_run(mc.create_experiment("texts")).info.run_id
    text = "0123456789abcdef" * 1100  # 17,600 characters: three tags
    set_text_tags(mc, run_id, "val_correct", text)
    mlflow.set_tracking_uri(uri)
    (row,) = mlflow.search_runs(experiment_names=["texts"]).to_dict("records")
    assert text_from_tags(row, "val_correct") == text and text_from_tags(row, "other") is None
    assert len(row["tags.hesstune.val_correct.2"]) == 17600 - 2 * 8000


def test_epochs_replayed_after_a_driver_restore_are_logged_once(tmp_path: Path) -> None:
    """Tune saves its experiment state (and this pickled callback) only now and then: a driver
    killed after logging an epoch restores the trial from an older checkpoint, which reports
    that epoch again. The store must hold each epoch once and name the replayed ones."""
    import pickle
    from types import SimpleNamespace

    from tuning.callbacks import TrackingCallback
    from tuning.tracking import client, ensure_parent_run, find_child

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent_id = ensure_parent_run(uri, "replay", tags={}, params={})
    trial = SimpleNamespace(trial_id="t1", config={"optim.lr": 0.01}, last_result={})

    def result(epoch: int, loss: float) -> dict[str, float]:
        return {"epoch": epoch, "train_loss": loss, "final": 0.0, "training_iteration": epoch}

    first = TrackingCallback(uri, exp_id, parent_id, sweep="replay", folder=tmp_path / "sweep")
    first.on_trial_start(0, [trial], trial)
    saved = pickle.dumps(first)  # the experiment state as Tune last saved it: before any epoch
    first.on_trial_result(0, [trial], trial, result(1, 0.9))
    first.on_trial_result(0, [trial], trial, result(2, 0.5))  # then SIGKILL
    assert first.outbox.wait(30)
    first.outbox.close()  # the driver's process ends

    second = pickle.loads(saved)  # the resumed driver; the trial restarts from scratch
    for epoch, loss in [(1, 0.9), (2, 0.5), (3, 0.3)]:
        second.on_trial_result(0, [trial], trial, result(epoch, loss))
    assert second.outbox.wait(30)
    mc = client(uri)
    run_id = find_child(mc, exp_id, parent_id, "t1")
    history = [(m.step, m.value) for m in mc.get_metric_history(run_id, "train_loss")]
    assert sorted(history) == [(1, 0.9), (2, 0.5), (3, 0.3)]
    assert mc.get_run(run_id).data.tags["hesstune.replayed_epochs"] == "1,2"
    second.outbox.close()


def test_a_trial_started_after_tunes_last_save_is_ended_as_lost_on_resume(tmp_path: Path) -> None:
    """Tune restores only the trials in its last saved state; the run of one that started later
    would stay RUNNING, then look like a killed trial of this sweep. It is ended, and says why."""
    import pickle
    from types import SimpleNamespace

    from tuning.callbacks import TrackingCallback
    from tuning.tracking import client, ensure_parent_run, find_child

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent_id = ensure_parent_run(uri, "lost", tags={}, params={})
    saved, lost = (SimpleNamespace(trial_id=t, config={}, last_result={}) for t in ("t1", "t2"))
    first = TrackingCallback(uri, exp_id, parent_id, sweep="lost", folder=tmp_path / "sweep")
    first.on_step_begin(0, [])
    for trial in (saved, lost):
        first.on_trial_start(0, [saved, lost], trial)
    second = pickle.loads(pickle.dumps(first))  # the resumed driver: Tune restored t1 only
    second.on_step_begin(0, [saved])
    assert second.outbox.wait(30)
    mc = client(uri)
    runs = {t: mc.get_run(find_child(mc, exp_id, parent_id, t)) for t in ("t1", "t2")}
    assert runs["t2"].info.status == "KILLED" and "driver died" in runs["t2"].data.tags["hesstune.lost"]
    assert runs["t1"].info.status == "RUNNING" and "hesstune.lost" not in runs["t1"].data.tags
    second.outbox.close()


def test_a_trial_retried_on_another_node_is_tagged_with_where_it_runs_now(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tuning.callbacks import TrackingCallback
    from tuning.tracking import client, ensure_parent_run, find_child

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent_id = ensure_parent_run(uri, "moved", tags={}, params={})
    trial = SimpleNamespace(trial_id="t1", config={}, last_result={})
    tracker = TrackingCallback(uri, exp_id, parent_id, sweep="moved", folder=tmp_path / "sweep")
    for epoch, node in [(1, "dead"), (2, "dead"), (3, "head")]:
        tracker.on_trial_result(0, [trial], trial, {"epoch": epoch, "node_id": node, "gpu_ids": ""})
    assert tracker.outbox.wait(30)
    sent = [op["tags"]["hesstune.node_id"] for op in tracker.outbox.records() if op["op"] == "tags"]
    assert sent == ["dead", "head"]  # once per move, not every epoch
    mc = client(uri)
    assert mc.get_run(find_child(mc, exp_id, parent_id, "t1")).data.tags["hesstune.node_id"] == "head"
    tracker.outbox.close()


class FlakyClient:
    """A real MLflow client whose store can be taken down: every call then fails as MLflow's
    REST client does when the server does not answer. ``lose_reply`` makes the next write land
    and its reply get lost (the write is in the store, the caller sees an error)."""

    WRITES = ("log_batch", "create_run", "set_tag", "set_terminated", "update_run")

    def __init__(self, uri: str) -> None:
        from tuning.tracking import client

        self.real, self.down, self.lose_reply = client(uri), False, False
        self.sent: list[tuple[str, int]] = []  # metric points the store was sent, landed or not

    def __getattr__(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        method = getattr(self.real, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.lose_reply and name in self.WRITES:
                self.lose_reply, self.down = False, True
                self._sent(kwargs)
                method(*args, **kwargs)
            if self.down:
                raise MlflowException(
                    "API request to http://127.0.0.1:1/api failed with exception Max retries exceeded"
                )
            self._sent(kwargs)
            return method(*args, **kwargs)

        return call

    def _sent(self, kwargs: dict[str, Any]) -> None:
        self.sent += [(m.key, m.step) for m in kwargs.get("metrics") or []]


def _trial_results(box: Any, trial: str, epochs: range) -> None:
    for epoch in epochs:
        box.put("metrics", trial=trial, step=epoch, ts=1000 * epoch, values={"epoch": epoch, "train_loss": 1 / epoch})


def test_an_outage_keeps_writes_on_disk_and_delivers_them_in_order_once(tmp_path: Path) -> None:
    """The store goes down mid-trial (the reply to one write lost on the way): writes wait on
    disk, ``put`` never blocks, and once the store answers every epoch is in it once, in order;
    the outbox says how long it was behind."""
    from tuning.outbox import Outbox
    from tuning.tracking import client, ensure_parent_run, find_child

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent_id = ensure_parent_run(uri, "outage", tags={}, params={})
    flaky = FlakyClient(uri)
    lines: list[str] = []
    box = Outbox(
        tmp_path / "sweep", uri, exp_id, parent_id, log=lines.append, retry_s=0.05, make_client=lambda _: flaky
    )
    box.put("open", trial="t1", name="outage-t1", params={"optim.lr": 0.01}, tags={})
    _trial_results(box, "t1", range(1, 3))
    assert box.wait(30)
    flaky.lose_reply = True  # epoch 3 lands, its reply does not; then the store is down
    _trial_results(box, "t1", range(3, 7))
    box.put("end", trial="t1", status="FINISHED")
    assert not box.wait(0.5) and box.pending_writes() >= 4
    assert box.outages == 1 and box.behind_for() > 0
    flaky.down = False
    assert box.wait(30) and box.pending_writes() == 0
    mc = client(uri)
    run_id = find_child(mc, exp_id, parent_id, "t1")
    history = mc.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # once each, in order
    # sent once each too: the store's own merging of identical points is not what keeps them single
    assert [step for key, step in flaky.sent if key == "train_loss"] == [1, 2, 3, 4, 5, 6]
    assert [m.timestamp for m in history] == [1000 * e for e in range(1, 7)]  # when measured, not when sent
    run = mc.get_run(run_id)
    assert run.info.status == "FINISHED" and "hesstune.replayed_epochs" not in run.data.tags
    assert box.behind_s > 0 and box.late >= 4
    assert "does not answer" in lines[0] and "caught up after" in lines[-1], lines
    box.close()


def test_a_driver_killed_during_an_outage_leaves_its_writes_for_the_next_one(tmp_path: Path) -> None:
    """What a driver could not deliver is in the sweep's folder; the next process (a resumed
    sweep, ``hesstune sync``) delivers it once, even the write whose delivery was cut off. A
    line cut short by the kill was never queued."""
    from tuning.outbox import OUTBOX, Outbox
    from tuning.tracking import client, ensure_parent_run, find_child

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent_id = ensure_parent_run(uri, "killed", tags={}, params={})
    flaky = FlakyClient(uri)
    first = Outbox(
        tmp_path / "sweep", uri, exp_id, parent_id, log=lambda _: None, retry_s=0.05, make_client=lambda _: flaky
    )
    first.put("open", trial="t1", name="killed-t1", params={}, tags={})
    _trial_results(first, "t1", range(1, 3))
    assert first.wait(30)
    flaky.lose_reply = True
    _trial_results(first, "t1", range(3, 5))
    assert not first.wait(0.3)
    first.close()  # the driver dies with epochs 3 (landed, unconfirmed) and 4 undelivered
    with open(tmp_path / "sweep" / OUTBOX, "ab") as fh:
        fh.write(b'{"op": "metrics", "trial": "t1", "st')  # the kill cut this line
    second = Outbox(tmp_path / "sweep", uri, exp_id, parent_id, log=lambda _: None)
    assert second.pending_writes() == 2 and second.wait(30)
    mc = client(uri)
    steps = [m.step for m in mc.get_metric_history(find_child(mc, exp_id, parent_id, "t1"), "train_loss")]
    assert steps == [1, 2, 3, 4]
    second.close()


def test_the_outbox_is_bounded_and_delivered_by_one_process(tmp_path: Path) -> None:
    from trainables.errors import HesstuneError
    from tuning.outbox import Outbox, TrackingBehind
    from tuning.tracking import ensure_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent_id = ensure_parent_run(uri, "bounded", tags={}, params={})
    flaky = FlakyClient(uri)
    flaky.down = True
    box = Outbox(
        tmp_path / "sweep",
        uri,
        exp_id,
        parent_id,
        log=lambda _: None,
        retry_s=0.05,
        max_pending=2000,
        make_client=lambda _: flaky,
    )
    box.put("open", trial="t1", name="bounded-t1", params={}, tags={})
    with pytest.raises(TrackingBehind, match="hesstune sweep --resume"):
        _trial_results(box, "t1", range(1, 100))
    with pytest.raises(HesstuneError, match="another process"):
        Outbox(tmp_path / "sweep", uri, exp_id, parent_id)
    box.close()


def test_progress_shows_running_trials_epochs_at_most_once_a_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from tuning import callbacks

    now = [1000.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: now[0])
    lines: list[str] = []
    progress = callbacks.ProgressCallback(4, "bound", epochs=5, heartbeat_s=60, log=lines.append)
    t1, t2, t3 = (SimpleNamespace(trial_id=f"t{i}", status="RUNNING", last_result={}) for i in (1, 2, 3))
    t3.status = "TERMINATED"
    trials = [t1, t2, t3]

    def at(seconds: float, trial: SimpleNamespace, epoch: int) -> None:
        now[0] = 1000.0 + seconds
        progress.on_trial_result(0, trials, trial, {"epoch": epoch})

    at(30, t1, 1)
    at(40, t2, 1)
    assert lines == []
    at(61, t1, 2)
    assert lines == ["  running: t1 epoch 2/5, t2 epoch 1/5; 1/4 done (61 s elapsed)"]
    at(90, t2, 2)
    t2.last_result, now[0] = {"final": 1.0, "bound": 0.5}, 1100.0
    progress.on_trial_complete(0, trials, t2)  # a completion line restarts the heartbeat
    at(150, t1, 3)
    assert len(lines) == 2 and lines[1].startswith("[2/4] t2: bound 0.5")
    at(161, t1, 4)
    assert len(lines) == 3 and lines[2].startswith("  running: t1 epoch 4/5")


def test_a_trial_larger_than_the_cluster_is_an_error_locally_and_a_warning_on_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    from tuning.sweep import SweepError, SweepOptions, check_trial_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    local = SweepOptions("s", "smoke", RunConfig(), gpus_per_trial=0.5)
    with pytest.raises(SweepError, match=r"--gpus-per-trial 0\.5 but the Ray cluster on this machine has 0 GPU"):
        check_trial_resources(local)
    lines: list[str] = []
    check_trial_resources(SweepOptions("s", "smoke", RunConfig(), cpus_per_trial=4, address="head:6379"), lines.append)
    assert lines == [
        "warning: --cpus-per-trial 4 but the Ray cluster at head:6379 has 2 CPU(s) now: trials wait "
        "until its autoscaler adds them (else use --cpus-per-trial ≤ 2)"
    ]
    check_trial_resources(SweepOptions("s", "smoke", RunConfig(), cpus_per_trial=2), lines.append)  # fits
    assert len(lines) == 1


def test_cli_turns_only_hesstune_errors_into_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's mistake is one line and exit 2; an internal bug keeps its traceback."""
    from trainables.errors import HesstuneError
    from tuning import cli

    def failing(exc: Exception) -> object:
        def command(_: object) -> int:
            raise exc

        return command

    monkeypatch.setattr(cli, "cmd_report", failing(HesstuneError("bad value: use another")))
    assert cli.main(["report", "x"]) == 2
    assert capsys.readouterr().err.strip() == "hesstune report: error: bad value: use another"
    monkeypatch.setattr(cli, "cmd_report", failing(ValueError("an internal bug")))
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["report", "x"])


def test_report_shows_trace_and_lambda_max_over_the_trials_that_measured_them() -> None:
    """--diagnostics-every N: trace and λ_max exist in some trials only; the table uses those
    (with their n) and says how many, and leaves them out below 3 instead of printing NaN."""
    import pandas as pd

    from tuning.report import format_report

    def table(diagnosed: int) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "trial_id": f"t{i}",
                "bound": 1.0 + i,
                "measure": 0.1 * i,
                "gap": 0.2 + 0.1 * i,
                "val_acc": 0.5,
                "test_acc": 0.7 - 0.01 * i,
                **({"trace": 10.0 * i, "lambda_max": 5.0 - i} if i < diagnosed else {}),
            }
            for i in range(8)
        )

    text = format_report(table(4), "bound")
    corr = text.split("Correlation with the true test gap")[1].splitlines()
    assert next(r for r in corr if r.startswith("trace")).split() == ["trace", "1.000", "1.000", "1.000", "4"]
    assert next(r for r in corr if r.startswith("lambda_max")).split()[1] == "-1.000"
    assert "(trace on 4, lambda_max on 4 of 8 trials: a sweep measures them on every N-th trial" in text
    text = format_report(table(2), "bound")
    corr = text.split("Correlation with the true test gap")[1].split("(trace on")[0]
    assert "trace" not in corr and "lambda_max" not in corr and "NaN" not in corr
    assert "trace, lambda_max left out of the table: a correlation needs 3 trials)" in text
    assert "trace on" not in format_report(table(8), "bound")  # every trial measured: nothing to say
