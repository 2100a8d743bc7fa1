"""End-to-end sweeps: real local Ray, real sqlite MLflow store, the real CLI in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tuning import selection

pytestmark = pytest.mark.slow
TRAIN_PROMISE = 0.90  # the README: `hesstune train` with no arguments, clean test accuracy

SWEEP = "it4"


def hesstune(
    *args: str, env: dict[str, str], timeout: float = 900, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuning.cli", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env["HESSTUNE_CACHE"] = os.environ.get("HESSTUNE_CACHE") or str(tmp_path_factory.mktemp("cache"))
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str]) -> dict[str, object]:
    out = tmp_path_factory.mktemp("sweep")
    elsewhere = tmp_path_factory.mktemp("unrelated-cwd")  # the sweep must write nothing here
    proc = hesstune(
        "sweep",
        "--space",
        "smoke",
        "--trials",
        "4",
        "--epochs",
        "2",
        "--output",
        str(out),
        "--name",
        SWEEP,
        "--set",
        "measure.samples=96",
        "--set",
        "measure.eigen_samples=32",
        "--seed",
        "3",
        "--noise",  # class-dependent: the default selection is val_band_bound (symmetric: val_acc)
        "pair:0.4",
        "--diagnostics-every",
        "2",
        env=cli_env,
        cwd=elsewhere,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert list(elsewhere.iterdir()) == [], "a sweep wrote outside --output"
    import mlflow

    uri = f"sqlite:///{out / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[SWEEP])
    return {"out": out, "uri": uri, "runs": runs, "stdout": proc.stdout}


def _children(sweep: dict[str, object]):  # type: ignore[no-untyped-def]
    runs = sweep["runs"]
    return runs[runs["tags.hesstune.role"] != "parent"]  # type: ignore[index]


def _parent(sweep: dict[str, object]):  # type: ignore[no-untyped-def]
    runs = sweep["runs"]
    return runs[runs["tags.hesstune.role"] == "parent"]  # type: ignore[index]


def test_one_parent_and_one_finished_child_per_trial(sweep: dict[str, object]) -> None:
    parent, children = _parent(sweep), _children(sweep)
    assert len(parent) == 1 and len(children) == 4
    assert set(children["status"]) == {"FINISHED"} and parent["status"].iloc[0] == "FINISHED"
    assert set(children["tags.mlflow.parentRunId"]) == {parent["run_id"].iloc[0]}
    assert children["tags.hesstune.trial_id"].nunique() == 4
    import mlflow

    experiment = mlflow.MlflowClient().get_experiment(parent["experiment_id"].iloc[0])
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"  # not MLflow's GenAI view
    assert set(children["tags.hesstune.transition"]) == {"true"}  # the injected, revealed F (docs/transition.md)


def test_child_runs_hold_config_params_epoch_metrics_and_final_measures(sweep: dict[str, object]) -> None:
    import mlflow

    children = _children(sweep)
    for key in ("params.optim.lr", "params.constraint.radius", "params.epochs", "params.task.noise.rate"):
        assert children[key].notna().all(), key
    assert children["params.epochs"].eq("2").all()
    for key in ("measure", "bound", "gap", "val_acc", "test_acc", "distance"):
        values = children[f"metrics.{key}"]
        assert values.map(math.isfinite).all(), key
    # --diagnostics-every 2: trace and λ_max (with their stated errors) in trials 0 and 2 only
    assert sorted(children["tags.hesstune.trial_index"].astype(int)) == [0, 1, 2, 3]
    diagnosed = children["tags.hesstune.trial_index"].astype(int) % 2 == 0
    for key in ("trace", "xtra/trace_se", "lambda_max", "xtra/lambda_max_residual"):
        assert children.loc[diagnosed, f"metrics.{key}"].map(math.isfinite).all(), key
        assert children.loc[~diagnosed, f"metrics.{key}"].isna().all(), key
    assert "metrics.xtra/objective" in children and "metrics.config/optim.lr" not in children
    history = mlflow.MlflowClient().get_metric_history(children["run_id"].iloc[0], "train_loss")
    assert sorted(m.step for m in history) == [1, 2]


def test_parent_statistics_match_the_children(sweep: dict[str, object]) -> None:
    parent, children = _parent(sweep), _children(sweep)
    tau = selection.kendall_tau(children["metrics.measure"].to_numpy(float), children["metrics.gap"].to_numpy(float))
    assert parent["metrics.kendall_measure_gap"].iloc[0] == pytest.approx(tau, abs=1e-12)
    best = children["metrics.test_acc"].max()
    picked = children.loc[children["metrics.bound"].idxmin(), "metrics.test_acc"]
    assert parent["metrics.regret_bound"].iloc[0] == pytest.approx(best - picked, abs=1e-12)
    assert parent["metrics.n_trials"].iloc[0] == 4
    picked = children.loc[_val_band_bound_pick(children), "metrics.test_acc"]
    assert parent["metrics.regret_val_band_bound"].iloc[0] == pytest.approx(best - picked, abs=1e-12)
    assert parent["tags.hesstune.selection"].iloc[0] == "val_band_bound"


def _val_band_bound_pick(children: pd.DataFrame) -> int:
    """Index of the lowest bound among trials not significantly worse than the top val_acc trial
    on the same validation samples (paired: losses − wins ≤ √(losses + wins), docs/results.md),
    recomputed from the child runs' per-sample correctness tags."""
    n_val = int(children["metrics.xtra/n_val"].iloc[0])
    assert n_val > 0 and children["tags.hesstune.val_correct.0"].map(lambda t: len(t) * 4 >= n_val).all()
    correct = np.array(
        [
            [int(bit) for byte in bytes.fromhex(t) for bit in f"{byte:08b}"][:n_val]
            for t in children["tags.hesstune.val_correct.0"]
        ],
        dtype=bool,
    )
    assert np.allclose(correct.mean(1), children["metrics.val_acc"])
    assert children["tags.hesstune.val_pred.0"].map(len).eq(n_val).all()  # val_acc_clean's per-sample predictions
    top = children["metrics.val_acc"].to_numpy() == children["metrics.val_acc"].max()
    ref = int(np.flatnonzero(top)[np.argmin(children["metrics.val_loss"].to_numpy()[top])])
    wins, losses = (correct[ref] & ~correct).sum(1), (~correct[ref] & correct).sum(1)
    band = children[(wins - losses) <= np.sqrt(wins + losses)]
    return int(band["metrics.bound"].idxmin())


def test_parent_artifacts(sweep: dict[str, object]) -> None:
    import mlflow

    run_id = _parent(sweep)["run_id"].iloc[0]
    paths = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"leaderboard.csv", "measure_vs_gap.png", "layer_distances.png", "best_configs"} <= paths
    artifacts = Path(sweep["out"]) / "mlartifacts"  # type: ignore[arg-type]
    assert any(p.name == "leaderboard.csv" for p in artifacts.rglob("*")), "artifacts are not under --output"


def test_sweep_prints_leaderboard_correlations_and_where_to_look(sweep: dict[str, object]) -> None:
    stdout = str(sweep["stdout"])
    assert "Leaderboard by val_band_bound" in stdout and "Correlation with the true test gap" in stdout
    assert (
        "(trace on 2, lambda_max on 2 of 4 trials: a sweep measures them on every N-th trial, --diagnostics-every N, "
        "1 for all; trace, lambda_max left out of the table: a correlation needs 3 trials)"
    ) in stdout
    table = stdout.split("Correlation with the true test gap")[1].split("(trace on")[0]
    assert "measure" in table and "trace" not in table and "lambda_max" not in table
    assert "validation band from the trials' per-sample validation correctness (paired)" in stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in stdout
    assert "Noise case (the injected F): about 40% of the training labels wrong" in stdout
    assert "class-dependent" in stdout and "the default selection is val_band_bound" in stdout
    assert stdout.count("[") >= 4  # one progress line per trial


def test_export_then_train_reproduces_the_selected_trial(
    sweep: dict[str, object], cli_env: dict[str, str], tmp_path: Path
) -> None:
    out = str(sweep["out"])
    proc = hesstune("export", SWEEP, "--output", out, "--top", "1", "-o", str(tmp_path / "best"), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    children = _children(sweep)
    chosen = children.loc[_val_band_bound_pick(children)]
    proc = hesstune(
        "train", "--config", str(tmp_path / "best" / "1.yaml"), "--output", str(tmp_path / "replay"), env=cli_env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads((tmp_path / "replay" / "metrics.json").read_text())["final"]
    for key in ("train_loss", "val_acc", "test_acc", "gap", "measure", "bound"):
        assert final[key] == pytest.approx(chosen[f"metrics.{key}"], rel=1e-6, abs=1e-9), key
    _exported_weights_reproduce_the_trial(tmp_path / "best", chosen)


def _exported_weights_reproduce_the_trial(folder: Path, chosen: pd.Series) -> None:
    """The exported weights (the trial's final checkpoint, no retraining), loaded the way the model
    card says, give the trial's logged clean test accuracy on the task's test images."""
    import safetensors.torch
    import timm

    from trainables.config import load_config
    from trainables.data import load_task
    from trainables.models import predict

    card = json.loads((folder / "1.card.json").read_text())
    assert card["trial_id"] == chosen["tags.hesstune.trial_id"] and card["criterion"] == "val_band_bound"
    assert card["metrics"]["bound"] == pytest.approx(chosen["metrics.bound"]) and card["epoch"] == 2
    cfg = load_config(folder / card["config"])
    model = timm.create_model(card["model"], num_classes=card["num_classes"])
    model.load_state_dict(safetensors.torch.load_file(folder / "1.safetensors"))
    model.eval()
    test = load_task(cfg.task).test
    accuracy = float((predict(model, test.x).argmax(1) == test.clean).float().mean())
    assert accuracy == pytest.approx(chosen["metrics.test_acc"], abs=1e-6)
    # the same through tuning.export.load_model, whose predictions name the task's class ids
    from tuning.export import load_model

    loaded = load_model(folder)
    assert not loaded.model.training
    predicted = torch.tensor([p.class_id for p in loaded.predict(test.x)])
    targets = torch.tensor(card["target_classes"])
    assert float((predicted == targets[test.clean]).float().mean()) == pytest.approx(
        chosen["metrics.test_acc"], abs=1e-6
    )


def _export(sweep: dict[str, object], env: dict[str, str], folder: Path, *extra: str) -> None:
    proc = hesstune("export", SWEEP, "--output", str(sweep["out"]), "-o", str(folder), *extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _test_split(folder: Path):  # type: ignore[no-untyped-def]
    from trainables.config import load_config
    from trainables.data import load_task

    return load_task(load_config(folder / "1.yaml").task).test


def _write_pngs(folder: Path, x: torch.Tensor, card: dict[str, object]) -> list[Path]:
    """The task's test images as a user would have them: 8-bit grey PNGs, before normalisation."""
    from PIL import Image

    pre = card["preprocessing"]
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)  # type: ignore[index]
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)  # type: ignore[index]
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    folder.mkdir()
    paths = [folder / f"{i}.png" for i in range(len(x))]
    for path, image in zip(paths, pixels, strict=True):
        Image.fromarray(image[0].numpy()).save(path)
    return paths


@pytest.fixture(scope="module")
def exported(sweep: dict[str, object], cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep's rank-1 pick exported once, for the tests that only read it."""
    folder = tmp_path_factory.mktemp("exported") / "best"
    _export(sweep, cli_env, folder)
    return folder


def test_predict_reads_image_files_as_the_task_reads_its_images(
    exported: Path, cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hesstune predict`` on PNGs of test images (8-bit grey, as a user would have them) gives the
    class the model gives on the task's own tensors, at the probability up to 8-bit rounding."""
    from tuning.cli import main
    from tuning.export import load_model

    loaded = load_model(exported)
    x = _test_split(exported).x[:8]
    paths = _write_pngs(tmp_path / "png", x, loaded.card)
    expected = loaded.predict(x)
    assert loaded.probabilities(paths).sub(loaded.probabilities(x)).abs().max() < 0.01
    proc = hesstune("predict", "--model", str(exported), *map(str, paths), env=cli_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(paths)
    for line, path, p in zip(lines, paths, expected, strict=True):
        where, label, probability = line.split("\t")
        assert where == str(path) and label == f"{p.name} (class {p.class_id})", line
        assert float(probability) == pytest.approx(p.probability, abs=0.01)
    (tmp_path / "notes.png").write_text("not an image")
    code = main(["predict", "--model", str(exported), str(paths[0]), str(tmp_path / "notes.png")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "notes.png" in err and len(err.strip().splitlines()) == 1, err


def test_export_register_creates_a_champion_version_that_predicts_as_the_export(
    sweep: dict[str, object], cli_env: dict[str, str], tmp_path: Path
) -> None:
    """``--register``: the rank-1 model logged on the sweep's parent run (artifacts under --output,
    nothing written in the working directory), a new version with alias champion and the
    selection's tags, and ``models:/NAME@champion`` predicting exactly as the exported weights."""
    import mlflow

    from tuning.export import load_model

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = hesstune(
        "export", SWEEP, "--output", str(sweep["out"]), "-o", str(tmp_path / "best"), "--register", "it4-model",
        env=cli_env, cwd=elsewhere,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(elsewhere.iterdir()) == [], "export --register wrote outside --output"
    children = _children(sweep)
    chosen = children.loc[_val_band_bound_pick(children)]
    client = mlflow.MlflowClient(str(sweep["uri"]))
    version = client.get_model_version_by_alias("it4-model", "champion")
    assert f"version {version.version} (alias champion)" in proc.stdout
    assert (
        version.tags["criterion"] == "val_band_bound" and version.tags["trial_id"] == chosen["tags.hesstune.trial_id"]
    )
    for key in ("bound", "measure", "val_acc"):
        assert float(version.tags[key]) == pytest.approx(chosen[f"metrics.{key}"]), key
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == _parent(sweep)["run_id"].iloc[0]
    assert logged.artifact_location.startswith((Path(sweep["out"]) / "mlartifacts").as_uri())  # type: ignore[arg-type]
    mlflow.set_tracking_uri(str(sweep["uri"]))
    registered = mlflow.pytorch.load_model("models:/it4-model@champion")
    x = _test_split(tmp_path / "best").x
    with torch.no_grad():
        assert torch.equal(registered(x).argmax(1), load_model(tmp_path / "best").probabilities(x).argmax(1))
        assert torch.allclose(registered(x), load_model(tmp_path / "best").model(x), atol=1e-5)


def test_export_refit_trains_on_train_and_val_and_writes_refit_weights(
    sweep: dict[str, object], cli_env: dict[str, str], tmp_path: Path
) -> None:
    """``--refit`` trains the rank-1 config on train ∪ val here (2 epochs of the smoke config),
    printing each epoch, and the card lists the refit weights with their train metrics and a
    clean test accuracy that loading them reproduces."""
    from tuning.export import load_model

    proc = hesstune(
        "export", SWEEP, "--output", str(sweep["out"]), "-o", str(tmp_path / "refit"), "--refit", env=cli_env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refit rank 1: epoch 1/2" in proc.stdout and "refit rank 1: epoch 2/2" in proc.stdout
    assert "merge_val: true" in (tmp_path / "refit" / "1.yaml").read_text()
    card = json.loads((tmp_path / "refit" / "1.card.json").read_text())
    refit = card["refit"]
    assert refit["weights"] == "1.refit.safetensors" and (tmp_path / "refit" / "1.refit.safetensors").is_file()
    assert refit["epoch"] == 2 and "no validation split" in refit["note"]
    assert set(refit["metrics"]) == {"train_loss", "train_acc", "test_acc", "n_train"}
    children = _children(sweep)
    assert refit["metrics"]["n_train"] > children["metrics.xtra/n_train"].iloc[0]  # train ∪ val
    loaded = load_model(tmp_path / "refit", refit=True)
    test = _test_split(tmp_path / "refit")
    accuracy = float((loaded.probabilities(test.x).argmax(1) == test.clean).float().mean())
    assert accuracy == pytest.approx(refit["metrics"]["test_acc"], abs=1e-6)


def test_report_command(sweep: dict[str, object], cli_env: dict[str, str]) -> None:
    proc = hesstune("report", SWEEP, "--output", str(sweep["out"]), "--criterion", "val_acc", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "Leaderboard by val_acc" in proc.stdout and "regret" in proc.stdout


def test_train_with_no_arguments_gives_the_model_the_readme_promises(cli_env: dict[str, str], tmp_path: Path) -> None:
    """``hesstune train`` alone runs the configuration the methods study recommends
    (``tuning.cli.RECOMMENDED_TRAIN``: REGSL at lr 1e-4, 30 epochs), not a plain fit that
    memorises the noisy labels: the README's quick start promises its clean test accuracy."""
    proc = hesstune("train", "--output", str(tmp_path / "run"), env=cli_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "30 epochs, regularizers: constraint, self_label" in proc.stdout
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert final["test_acc"] >= TRAIN_PROMISE and final["memorized"] <= 0.10, final


# -- the Optuna study: warm start, two objectives, extension ----------------------------------------
MO_SWEEP = "mo"
MO_MODEL = "mo-champion"


@pytest.fixture(scope="module")
def mo_sweep(sweep: dict[str, object], cli_env: dict[str, str]) -> dict[str, object]:
    """A second sweep in the same --output: warm-started from ``it4``, searching val_acc and bound
    together (bound is measured at the last of 2 epochs only), 4 trials; then extended to 6 with
    ``--resume mo --trials 6``, which registers its pick at the end (``--register``)."""
    out = str(sweep["out"])
    common = ["--output", out, "--set", "measure.samples=96", "--set", "measure.eigen_samples=32"]
    common += ["--optuna-storage", f"sqlite:///{sweep['out']}/optuna.db"]  # an RDB; it4 has the default journal
    first = hesstune(
        "sweep", "--space", "smoke", "--trials", "4", "--epochs", "2", "--name", MO_SWEEP, "--seed", "5",
        "--noise", "pair:0.4", "--warm-start", SWEEP, "--objective", "val_acc,bound", *common, env=cli_env,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    second = hesstune(
        "sweep", "--resume", MO_SWEEP, "--trials", "6", "--output", out, "--register", MO_MODEL, env=cli_env
    )
    assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
    import mlflow

    mlflow.set_tracking_uri(str(sweep["uri"]))
    runs = mlflow.search_runs(experiment_names=[MO_SWEEP])
    return {"out": sweep["out"], "uri": sweep["uri"], "runs": runs, "first": first.stdout, "second": second.stdout}


def test_warm_start_tries_the_earlier_sweeps_best_configs_first(
    sweep: dict[str, object], mo_sweep: dict[str, object]
) -> None:
    from tuning.report import finished_trials

    parent = _parent(sweep)
    earlier = finished_trials(str(sweep["uri"]), parent["experiment_id"].iloc[0], parent["run_id"].iloc[0])
    # the criterion it4's report selects with (pair noise) ranks the trials inside its validation band
    best = selection.rank(earlier, "val_band_bound")[:3]
    assert best[0] == _children(sweep).loc[_val_band_bound_pick(_children(sweep)), "tags.hesstune.trial_id"]
    searched = ("params.optim.lr", "params.constraint.radius")  # the smoke space
    old = _children(sweep).set_index("tags.hesstune.trial_id").loc[best, list(searched)]
    new = _children(mo_sweep)
    new = new.set_index(new["tags.hesstune.trial_index"].astype(int)).sort_index()
    k = len(best)
    assert new.loc[list(range(k)), list(searched)].to_numpy().tolist() == old.to_numpy().tolist()
    assert new.loc[k, "params.optim.lr"] not in set(old["params.optim.lr"])  # then the searcher's own draws


def test_extending_a_sweep_adds_trials_to_the_same_study_and_parent_run(mo_sweep: dict[str, object]) -> None:
    import optuna

    from tuning.sweep import load_study

    parent, children = _parent(mo_sweep), _children(mo_sweep)
    assert len(parent) == 1 and len(children) == 6 and set(children["status"]) == {"FINISHED"}
    assert set(children["tags.mlflow.parentRunId"]) == {parent["run_id"].iloc[0]}
    assert sorted(children["tags.hesstune.trial_index"].astype(int)) == list(range(6))
    assert parent["metrics.n_trials"].iloc[0] == 6 and parent["status"].iloc[0] == "FINISHED"
    out = Path(mo_sweep["out"])  # type: ignore[arg-type]
    study = optuna.load_study(study_name=MO_SWEEP, storage=f"sqlite:///{out}/optuna.db")  # --optuna-storage
    assert len(study.trials) == 6 and {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert study.metric_names == ["val_acc", "bound"]  # what optuna-dashboard shows
    assert len(load_study(out, MO_SWEEP).trials) == 6
    assert not (out / "ray_results" / MO_SWEEP / "optuna.journal").exists()
    journal = optuna.storages.JournalStorage(  # the default: a journal file in the sweep's folder
        optuna.storages.journal.JournalFileBackend(str(out / "ray_results" / SWEEP / "optuna.journal"))
    )
    first = optuna.load_study(study_name=SWEEP, storage=journal)
    assert [t.number for t in first.trials] == [0, 1, 2, 3] and first.directions == [
        optuna.study.StudyDirection.MINIMIZE  # it4's objective: bound
    ]
    by_index = children.set_index(children["tags.hesstune.trial_index"].astype(int))
    for trial in study.trials:  # the study's values are the runs' final val_acc and bound
        assert trial.values == pytest.approx(
            [by_index.loc[trial.number, "metrics.val_acc"], by_index.loc[trial.number, "metrics.bound"]]
        )
    second = str(mo_sweep["second"])
    assert "extending sweep mo: 2 more trial(s), 6 in total" in second and "[6/6]" in second


def test_multi_objective_report_and_artifact_hold_the_non_dominated_trials(mo_sweep: dict[str, object]) -> None:
    import mlflow

    children = _children(mo_sweep)
    points = {
        row["tags.hesstune.trial_id"]: (row["metrics.val_acc"], row["metrics.bound"]) for _, row in children.iterrows()
    }
    front = {  # recomputed here: no other trial at least as good on both and better on one
        t
        for t, (acc, bound) in points.items()
        if not any(a >= acc and b <= bound and (a > acc or b < bound) for a, b in points.values())
    }
    run_id = _parent(mo_sweep)["run_id"].iloc[0]
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="pareto_front.csv"))
    assert set(pd.read_csv(folder)["trial_id"]) == front
    assert "pareto_front.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    report = str(mo_sweep["second"]).split("Pareto front of the search objectives (val_acc ↑, bound ↓)")[1]
    assert report.startswith(f": {len(front)} of 6 trials")
    listed = report.split("\n\n")[0].splitlines()[2:]
    assert {line.split()[0] for line in listed} == front


def test_sweep_register_puts_the_pick_of_all_trials_in_the_registry(mo_sweep: dict[str, object]) -> None:
    """``sweep --register`` at the end of the extension: the champion is the pick over all 6 trials."""
    import mlflow

    from tuning.report import finished_trials

    uri, parent = str(mo_sweep["uri"]), _parent(mo_sweep)
    table = finished_trials(uri, parent["experiment_id"].iloc[0], parent["run_id"].iloc[0])
    assert len(table) == 6
    pick = selection.select(table, selection.recommended_criterion(table))
    version = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(MO_MODEL, "champion")
    assert version.tags["trial_id"] == pick and version.tags["sweep"] == MO_SWEEP
    assert f"registered {MO_MODEL} version {version.version} (alias champion)" in str(mo_sweep["second"])
