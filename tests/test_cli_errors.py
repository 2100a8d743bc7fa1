"""Bad input: one clear line on stderr, exit status 2, nothing started or written (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

BAD_SWEEPS = {
    "unknown preset": (["--space", "nope"], "nope"),
    "unknown objective": (["--objective", "sharpness"], "sharpness"),
    "oracle objective": (["--objective", "oracle"], "oracle"),
    "file tracking uri": (["--tracking-uri", "file:///tmp/mlruns"], "file"),
    "relative sqlite uri": (["--tracking-uri", "sqlite:///mlflow.db"], "relative"),
    "zero trials": (["--trials", "0"], "--trials 0"),
    "bad noise": (["--noise", "symmetric:1.2"], "1.2"),
    "missing task folder": (["--task", "imagefolder:/no/such/folder"], "/no/such/folder"),
    "unknown model": (["--model", "resnet_nope"], "resnet_nope"),
    "unknown scheduler": (["--scheduler", "pbt"], "pbt"),
    "negative retries": (["--max-failures", "-1"], "--max-failures"),
    "unknown resume name": (["--resume", "never-ran"], "never-ran"),
    "cuda without a gpu per trial": (["--set", "device=cuda"], "--gpus-per-trial is 0"),
    "oracle among two objectives": (["--objective", "val_acc,oracle"], "oracle uses the clean test labels"),
    "an objective named twice": (["--objective", "bound,bound"], "name each criterion once"),
    "unknown warm-start sweep": (["--warm-start", "never-ran"], "no sweep named 'never-ran'"),
    "optuna storage not an RDB": (["--optuna-storage", "redis://localhost"], "redis://localhost"),
}


def _finished_sweep(out: Path, name: str, trials: int, **fields: object) -> Path:
    """A sweep's metadata as a finished sweep leaves it (no Ray, no MLflow needed to refuse)."""
    from trainables.config import RunConfig
    from tuning.sweep import SweepOptions, SweepPaths

    paths = SweepPaths(out, name)
    paths.experiment.mkdir(parents=True)
    opts = SweepOptions(name=name, space="smoke", base=RunConfig(), trials=trials, output=out, **fields)  # type: ignore[arg-type]
    paths.meta.write_text(json.dumps(opts.to_json()))
    paths.journal.write_text("")
    return paths.experiment


def test_resume_with_fewer_trials_than_the_sweep_has_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = _finished_sweep(tmp_path, "four", 4)
    before = sorted(p.name for p in folder.iterdir())
    code, err = run_cli(capsys, "sweep", "--resume", "four", "--trials", "3", "--output", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "--trials 3 is below the 4 trials sweep 'four' already has" in err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_sweep_whose_study_was_in_memory_resumes_but_does_not_extend(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (_finished_sweep(tmp_path, "old", 4) / "optuna.journal").unlink()
    code, err = run_cli(capsys, "sweep", "--resume", "old", "--trials", "6", "--output", str(tmp_path))
    assert code == 2 and "kept its Optuna study in memory" in err and "--warm-start old" in err


def test_output_that_is_a_file_or_not_writable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, err = run_cli(capsys, "sweep", "--output", str(a_file))
    assert code == 2 and "is a file" in err
    code, err = run_cli(capsys, "sweep", "--output", str(a_file / "below"))
    assert code == 2 and "cannot be created" in err


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The CLI in-process (validation never starts Ray): exit status and stderr."""
    from tuning.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_input_fails_fast_and_writes_nothing(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args, needle = BAD_SWEEPS[case]
    out = tmp_path / "out"
    code, err = run_cli(capsys, "sweep", *args, "--output", str(out))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and needle in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("params:\n  optim.lr: {float: [0.1, 0.01]}\n", "optim.lr"),
        ("params:\n  optim.nope: {float: [0.1, 0.2]}\n", "optim.nope"),
        ("params: [unclosed\n", "YAML"),
    ],
)
def test_bad_space_file(text: str, needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(text)
    code, err = run_cli(capsys, "sweep", "--space", str(space), "--output", str(tmp_path / "out"))
    assert code == 2 and needle in err, err
    assert not (tmp_path / "out").exists()


def _empty_class_folder(tmp_path: Path) -> str:
    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a" / "x.png")
    return f"imagefolder:{tmp_path / 'img'}"


BAD_TRAINS = {
    "unknown config key": (["--set", "optim.lrr=1"], "optim.lrr"),
    "unknown model": (["--model", "resnet_nope"], "resnet_nope"),
    "unknown task": (["--task", "mnist"], "mnist"),
    "missing dataset folder": (["--task", "cifar10:/no/such/dir"], "/no/such/dir"),
    "noise rate outside [0, 1)": (["--noise", "pair:1.0"], "1.0"),
    "negative noise rate": (["--noise", "symmetric:-0.1"], "-0.1"),
    "sigma <= 0": (["--set", "nso.enabled=true", "--set", "nso.sigma=0"], "nso.sigma"),
    "k < 1": (["--set", "nso.enabled=true", "--set", "nso.k=0"], "nso.k"),
    "singular transition": (
        [
            "--set",
            "consistent.enabled=true",
            "--set",
            "consistent.rate=0.8",
            "--set",
            "measure.enabled=false",
            "--epochs",
            "1",
        ],
        "singular",
    ),
    "nso and sam together": (["--set", "nso.enabled=true", "--set", "sam.enabled=true"], "nso and sam"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAINS))
def test_bad_train_input(case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args, needle = BAD_TRAINS[case]
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", *args, "--output", str(out))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not out.exists()


def test_empty_class_is_rejected(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_cli(
        capsys,
        "train",
        "--task",
        _empty_class_folder(tmp_path),
        "--pretrained",
        "none",
        "--output",
        str(tmp_path / "out"),
    )
    assert code == 2 and "holds no images" in err and not (tmp_path / "out").exists()


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_cli(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


@pytest.mark.slow
@pytest.mark.parametrize(("flag", "kind"), [("--gpus-per-trial", "GPU"), ("--cpus-per-trial", "CPU")])
def test_a_trial_larger_than_the_ray_cluster_is_refused_not_left_waiting(flag: str, kind: str, tmp_path: Path) -> None:
    """Real local Ray: Tune would queue such trials forever; the sweep names the shortfall instead."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuning.cli",
            "sweep",
            "--space",
            "smoke",
            "--pretrained",
            "none",
            flag,
            "4096",
            "--output",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and lines == [
        next(line for line in lines if f"{flag} 4096 but the Ray cluster on this machine has" in line)
    ], proc.stderr[-2000:]
    assert f"{kind}(s): use" in lines[0] and not out.exists()


def _damaged_idx(tmp_path: Path) -> str:
    from tests.conftest import write_idx_folder

    root = write_idx_folder(tmp_path / "idx", train=40, test=20, gz=False)
    labels = root / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\0\0\x08\x03" + labels.read_bytes()[4:])  # a label file claiming 3 dimensions
    return f"mnist:{root}"


def _idx_ok(tmp_path: Path) -> str:
    from tests.conftest import write_idx_folder

    return f"mnist:{write_idx_folder(tmp_path / 'idx', train=40, test=20)}"


BAD_DATA = {
    "idx folder without the files": (lambda p: f"fashion-mnist:{p}", [], "lacks train-images-idx3-ubyte"),
    "wrong magic number": (_damaged_idx, [], "wrong magic"),
    "class in source and target": (
        _idx_ok,
        ["--set", "task.source_classes=[0,5]", "--set", "task.target_classes=[5,6]"],
        "in both",
    ),
    "class the task lacks": (_idx_ok, ["--set", "task.target_classes=[5,10]"], "class 10"),
}


@pytest.mark.parametrize("command", ["train", "sweep"])
@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_before_anything_runs(
    case: str, command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make, extra, needle = BAD_DATA[case]
    out = tmp_path / "out"
    code, err = run_cli(capsys, command, "--task", make(tmp_path), "--pretrained", "none", *extra, "--output", str(out))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize(("name", "needle"), [("", "empty"), ("a/b", "'/'"), ("team:model", "':'"), ("..x", "path")])
def test_register_refuses_the_names_mlflow_rejects_before_anything_is_written(
    name: str, needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """MLflow 3.17.2 (``mlflow.utils.validation._validate_model_name``) rejects these names only
    after the model was logged; export refuses them before reading the sweep."""
    out = tmp_path / "best"
    code, err = run_cli(capsys, "export", "never-ran", "--output", str(tmp_path), "--register", name, "-o", str(out))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--register" in lines[0] and needle in lines[0], err
    assert not out.exists()


def test_export_to_a_file_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a_file = tmp_path / "best"
    a_file.write_text("x")
    code, err = run_cli(capsys, "export", "never-ran", "--output", str(tmp_path), "-o", str(a_file))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "is a file" in lines[0] and str(a_file) in lines[0], err
    assert a_file.read_text() == "x"


def test_predict_needs_an_export_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(image)
    code, err = run_cli(capsys, "predict", "--model", str(tmp_path), str(image))
    assert code == 2 and "1.card.json" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "2.card.json").write_text('{"weights": "2.safetensors"}')
    code, err = run_cli(capsys, "predict", "--model", str(tmp_path), "--rank", "2", str(image))
    assert code == 2 and "2.safetensors" in err and len(err.strip().splitlines()) == 1, err
    code, err = run_cli(capsys, "predict", "--model", str(tmp_path), "--rank", "2", "--refit", str(image))
    assert code == 2 and "2.refit.safetensors" in err, err
