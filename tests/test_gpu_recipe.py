"""The GPU recipe (benchmarks/gpu_recipe.py) end to end on CPU: a tiny generated CIFAR-100 in the
official python-pickle format, timm's ``test_resnet`` with weights from a file, the study's
design and analysis, the KEY lines; and the one-line errors for bad input."""

from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_recipe  # noqa: E402
from benchmarks.study.design import PRESETS, jobs  # noqa: E402
from benchmarks.study.runner import labels_from_text, labels_text  # noqa: E402

KEYS = [  # KEY lines the smoke run must print with finite values (one seed: no held-out constants)
    "kendall_tau_measure_gap_noise40",
    "kendall_tau_bound_gap_noise40",
    "regret_bound_noise40",
    "regret_measure_noise40",
    "regret_val_noisy_noise40",
    "bound_holds_fraction_noise40",
    "noval_val_split_acc_noise40",
    "delta_regret_bound_vs_val_all",
]


def write_cifar100(root: Path, per_class: int = 2, seed: int = 0) -> Path:
    """A CIFAR-100-format folder (``cifar-100-python/{train,test,meta}``): 100 classes, 32×32 RGB,
    each class a random colour pattern plus noise, so that the labels are learnable."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 160, size=(100, 3 * 32 * 32))
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", per_class), ("test", 1)):
        fine = np.repeat(np.arange(100), count)
        data = (pattern[fine] + rng.integers(0, 96, size=(len(fine), pattern.shape[1]))).astype(np.uint8)
        batch = {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny data set and a weights file for ``test_resnet`` (a random backbone)."""
    import timm

    from trainables.models import save_weights

    root = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    weights = root / "test_resnet.safetensors"
    save_weights(timm.create_model("test_resnet", num_classes=5).state_dict(), weights)
    return {"data": write_cifar100(root / "data"), "weights": weights, "root": root}


def _smoke_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(inputs["data"]),
        "--model",
        "test_resnet",
        "--weights",
        f"file:{inputs['weights']}",
        "--device",
        "cpu",
        "--smoke",
        "--image-size",
        "32",
        "--measure-samples",
        "32",
        "--workers",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def _key_values(stdout: str) -> dict[str, str]:
    lines = stdout.strip().splitlines()
    tail = lines[lines.index("") + 1 :] if "" in lines else lines
    while "" in tail:  # the KEY lines are the last block
        tail = tail[tail.index("") + 1 :]
    return dict(line.split(": ", 1) for line in tail)


def test_recipe_smoke_runs_end_to_end_on_cpu(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = inputs["root"] / "out"
    assert gpu_recipe.main(_smoke_args(inputs, out)) == 0
    printed = capsys.readouterr().out
    assert "4 runs trained" in printed  # 2 configs × 2 arms, one seed, symmetric 40 %
    for name in ("runs.jsonl", "trials.csv", "tables.md", "summary.json", "recipe.json", "val_labels.json"):
        assert (out / name).is_file(), name
    assert (out / "figures" / "measure_vs_gap.png").is_file()
    trials = pd.read_csv(out / "trials.csv", dtype={"val_pred": str})
    assert len(trials) == 2 * 2 * 2  # runs × arms × checkpoints (epochs 1, 2)
    assert set(trials["arm"]) == {"tv", "pool"} and set(trials["epochs"]) == {1, 2}
    assert set(trials["num_classes"]) == {100} and set(trials["setting"]) == {"symmetric40"}
    tv = trials[trials["arm"] == "tv"]
    assert set(tv["n_train"]) == {180} and set(tv["n_val"]) == {20}  # 200 images, 10 % validation
    assert set(trials[trials["arm"] == "pool"]["n_train"]) == {200}
    assert np.isfinite(trials[["measure", "bound", "train_loss", "test_acc", "gap"]].to_numpy()).all()
    assert all(len(labels_from_text(p)) == 20 for p in tv["val_pred"])  # K = 100: comma form
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {row["measure_samples"] for entry in rows for row in entry["rows"]} == {32.0}  # the capped S
    keys = _key_values(printed)
    assert keys == json.loads((out / "summary.json").read_text())
    for key in KEYS:
        assert math.isfinite(float(keys[key])), (key, keys[key])
    assert "| symmetric40 | full |" in (out / "tables.md").read_text()

    # resumable: the same command trains nothing and reports the same analysis
    assert gpu_recipe.main([*_smoke_args(inputs, out), "--no-figures"]) == 0
    again = capsys.readouterr().out
    assert "0 runs trained" in again and _key_values(again) == keys
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4
    # … and another recipe in the same folder is refused, naming what differs
    assert gpu_recipe.main(_with(_smoke_args(inputs, out), "--image-size", "16")) == 2
    assert "(base.task.image_size differ)" in capsys.readouterr().err


def _with(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag`` set to ``value`` (replaced in place, or appended)."""
    if flag in args:
        args = list(args)
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--data", "{root}/nowhere", "data folder '{root}/nowhere' does not exist"),
        ("--data", "{root}/empty", "cifar100 files missing"),
        ("--weights", "file:{root}/missing.safetensors", "weights file '{root}/missing.safetensors' does not exist"),
        ("--weights", "timm", "timm weights for 'test_resnet' are not in the local Hugging Face cache"),
        ("--weights", "imagenet", "--weights 'imagenet' is unknown"),
        ("--model", "resnet_nope", "unknown model 'resnet_nope'"),
        ("--settings", "symmetric40,noisy", "unknown setting 'noisy'"),
        ("--train-size", "5000", "--train-size 5000: the training part"),
        ("--out", "{root}/other", "holds results of a different recipe"),
    ],
)
def test_recipe_rejects_bad_input_in_one_line(
    inputs: dict[str, Path], capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    root = inputs["root"]
    (root / "empty").mkdir(exist_ok=True)
    (root / "other").mkdir(exist_ok=True)
    (root / "other" / "recipe.json").write_text(json.dumps({"base": {}, "sizes": {}, "checkpoints": [1]}))
    args = _with(_smoke_args(inputs, root / "fresh"), flag, value.format(root=root))
    assert gpu_recipe.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(root=root) in err
    assert not (root / "fresh").exists()  # nothing written before the checks pass


def test_recipe_refuses_cuda_without_a_gpu(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_recipe.main(_with(_smoke_args(inputs, inputs["root"] / "fresh"), "--device", "cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_recipe_preset_carries_task_and_model_into_every_run(inputs: dict[str, Path]) -> None:
    args = gpu_recipe.parse_args(
        ["--data", str(inputs["data"]), "--model", "resnet50", "--sizes", "full,half", "--train-size", "1000"]
    )
    args.model = gpu_recipe.resolve_model(args.model, args.weights)
    preset = gpu_recipe.build_preset(args, n_train=45000)
    todo = gpu_recipe.recipe_jobs(preset)
    assert len(todo) == 4 * 2 * 3 * 2 * 12  # the papers' 4 noise rates × sizes × seeds × arms × runs
    assert {j.setting for j in todo} == set(gpu_recipe.PAPER_SETTINGS)
    flat = next(j for j in todo if j.size == "half" and j.arm == "pool").overrides()
    assert flat["model.name"] == "resnet50.tv_in1k" and flat["model.pretrained"] == "timm"
    assert flat["task.name"] == f"cifar100:{inputs['data'].resolve()}" and flat["device"] == "cuda"
    assert (flat["task.train_size"], flat["task.image_size"], flat["optim.batch_size"]) == (500, 128, 256)
    assert flat["task.merge_val"] is True and flat["epochs"] == 10
    # the built-in presets are untouched: digits, CPU, no extra overrides
    default = jobs(PRESETS["default"])
    assert all(j.extra == () for j in default)
    assert default[0].overrides()["task.name"] == "digits" and default[0].overrides()["device"] == "cpu"


def test_label_text_round_trips_for_few_and_many_classes() -> None:
    assert labels_text([3, 0, 4], 5) == "304"  # the digits study's stored form, unchanged
    assert list(labels_from_text("304")) == [3, 0, 4]
    for labels in ([57], [7], [12, 7, 95, 0]):
        assert list(labels_from_text(labels_text(labels, 100))) == labels
