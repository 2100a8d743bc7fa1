"""Deliver what a sweep selected: configs, weights and model cards; the refit on train ∪ val;
loading and predicting without the data set; the MLflow Model Registry.

A model card (``r.card.json``) says what was picked and why, and everything :func:`load_model`
needs to run the model on image files: the architecture, the image size, the task's
normalisation and what each output means (docs/design.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import nn

from trainables.config import RunConfig
from trainables.data import Preprocessing
from trainables.errors import HesstuneError
from tuning import selection

__all__ = [
    "CARD_METRICS",
    "CHAMPION",
    "ExportError",
    "LoadedModel",
    "Prediction",
    "check_registered_model_name",
    "export_configs",
    "final_checkpoint",
    "load_model",
    "register_model",
]

CHAMPION = "champion"  # the alias --register moves to the version it creates


class ExportError(HesstuneError):
    """A model folder, image or registry name that cannot be used."""


CARD_METRICS = (
    "bound",
    "measure",
    "val_acc",
    "val_band_bound",
    "val_acc_clean",
    "val_loss",
    "train_acc",
    "f_noise_rate",
    "f_structure",
    "test_acc",
)
REFIT_METRICS = ("train_loss", "train_acc", "test_acc", "n_train")
REGISTRY_TAGS = ("bound", "measure", "val_acc")  # tagged on a registered version, with criterion and trial

RESIZE = "RGB (grey repeated), values / 255, shorter side resized to image_size (bilinear, antialiased), centre crop"


# -- export ------------------------------------------------------------------------------------------
def export_configs(
    table: pd.DataFrame,
    criterion: str,
    top: int,
    folder: Path,
    *,
    refit: bool = False,
    trials_dir: Path | None = None,
    sweep: str = "",
    log: Callable[[str], None] = lambda _: None,
) -> list[Path]:
    """Write the ``top`` trials by ``criterion``: per rank r, the replayable config ``r.yaml``
    and, when ``trials_dir`` (the sweep's Ray experiment folder) holds the trial's final
    checkpoint, its weights ``r.safetensors`` (no retraining) and a model card ``r.card.json``
    (what was picked, why, and how to load and use it). Returns the paths written.

    ``refit`` makes ``r.yaml`` train the chosen config on train ∪ validation (``task.merge_val``),
    the final fit that delivered the best clean accuracy without a validation split under
    symmetric noise (docs/results.md), and trains it here too: ``r.refit.safetensors``, listed in
    the card; ``log`` receives its progress, one line per epoch.
    """
    from tuning.report import config_from_params

    folder.mkdir(parents=True, exist_ok=True)
    by_id = {row["trial_id"]: row for _, row in table.iterrows()}
    paths = []
    for rank, trial_id in enumerate(selection.rank(table, criterion)[:top], start=1):
        cfg = config_from_params(by_id[trial_id]["params"])
        replay = cfg.replace(**{"task.merge_val": True}) if refit else cfg
        header = f"# hesstune export: rank {rank} by {criterion}, trial {trial_id}" + (
            " (refit on train ∪ val)" if refit else ""
        )
        path = folder / f"{rank}.yaml"
        path.write_text(header + "\n" + replay.to_yaml())
        paths.append(path)
        state = _final_state(trials_dir, trial_id) if trials_dir is not None else None
        refitted = _refit(folder, rank, replay, log) if refit else None
        if state is not None or refitted is not None:
            paths += _write_model(folder, rank, cfg, state, by_id[trial_id], criterion, sweep, refitted)
    return paths


def final_checkpoint(trials_dir: Path, trial_id: str) -> Path | None:
    """The trial's last checkpoint file (Ray keeps one per trial); None if absent. ``trials_dir``
    is the sweep's folder: the trial ran in its first Ray run or in an extension (``extend-N/``)."""
    from trainables.trainable import STATE_FILE

    folders = [trials_dir / f"trial_{trial_id}", *trials_dir.glob(f"extend-*/trial_{trial_id}")]
    checkpoints = sorted(c for folder in folders for c in folder.glob(f"checkpoint_*/{STATE_FILE}"))
    return checkpoints[-1] if checkpoints else None


def _final_state(trials_dir: Path, trial_id: str) -> dict[str, Any] | None:
    """The trial's last checkpoint, read weights-only; None if absent."""
    from trainables.trainable import read_state

    path = final_checkpoint(trials_dir, trial_id)
    if path is None:
        return None
    state, problem = read_state(path.parent)  # checked against the checksum written with it
    if state is None:
        raise ExportError(
            f"trial {trial_id}'s final checkpoint {str(path.parent)!r} is {problem}: export another rank, "
            "or replay the trial with hesstune train --config on its exported YAML"
        )
    return dict(state)


def _refit(folder: Path, rank: int, cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Train the refit config (train ∪ val) in this process and write ``r.refit.safetensors``;
    the card's ``refit`` entry. The Hessian measures are skipped: they come after the last
    epoch's training, so the weights are the same, and need a validation-free reading anyway."""
    from trainables.loop import fine_tune
    from trainables.models import save_weights

    run_cfg = cfg.replace(**{"measure.enabled": False})
    log(f"refit rank {rank}: {cfg.epochs} epochs of {cfg.model.name} on {cfg.task.name} (train ∪ val)")
    result = None
    for result in fine_tune(run_cfg, log=log, evaluate_at=()):
        log(
            f"  refit rank {rank}: epoch {result.epoch}/{cfg.epochs}  train objective "
            f"{result.metrics['train_objective']:.4f}  ({result.metrics['epoch_s']:.1f} s)"
        )
    assert result is not None  # epochs ≥ 1 (validated)
    path = folder / f"{rank}.refit.safetensors"
    save_weights(result.state()["model"], path)
    metrics = {m: float(result.metrics[m]) for m in REFIT_METRICS if m in result.metrics}
    return {
        "weights": path.name,
        "config": f"{rank}.yaml",
        "epoch": result.epoch,
        "metrics": metrics,
        "note": (
            "trained on train ∪ val: there is no validation split, so no val-based number (val_acc, "
            "val_band_bound, …); train metrics are on the noisy training labels, test_acc is the clean "
            "test accuracy, for evaluation"
        ),
    }


def _write_model(
    folder: Path,
    rank: int,
    cfg: RunConfig,
    state: dict[str, Any] | None,
    row: pd.Series,
    criterion: str,
    sweep: str,
    refit: dict[str, Any] | None = None,
) -> list[Path]:
    """The trial's weights (when its checkpoint is there) and the model card."""
    from safetensors.torch import save_file

    from trainables.data import task_preprocessing

    preprocessing = task_preprocessing(cfg.task)
    num_classes = len(preprocessing.classes)
    paths, card = [], _card(rank, cfg, row, criterion, sweep, preprocessing)
    if state is not None:
        weights = {k: v.detach().contiguous() for k, v in state["model"].items()}
        num_classes = int(weights[_head_weight(cfg.model.name, weights)].shape[0])
        path = folder / f"{rank}.safetensors"
        save_file(weights, str(path), metadata={"model": cfg.model.name, "trial_id": str(row["trial_id"])})
        paths.append(path)
        card.update(weights=path.name, epoch=int(state.get("epoch", 0)))
    if refit is not None:
        paths.append(folder / refit["weights"])
        card["refit"] = refit
    card["num_classes"] = num_classes
    weights_file = card["weights"] or (refit or {}).get("weights")
    card["load"] = (
        f"model = timm.create_model({cfg.model.name!r}, num_classes={num_classes}); "
        f"model.load_state_dict(safetensors.torch.load_file({weights_file!r})); model.eval()"
    )
    card_path = folder / f"{rank}.card.json"
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    return [*paths, card_path]


def _card(
    rank: int, cfg: RunConfig, row: pd.Series, criterion: str, sweep: str, preprocessing: Preprocessing
) -> dict[str, Any]:
    metrics = {m: float(row[m]) for m in CARD_METRICS if m in row and pd.notna(row[m])}
    return {
        "sweep": sweep,
        "trial_id": str(row["trial_id"]),
        "rank": rank,
        "criterion": criterion,
        "why": selection.get_criterion(criterion).description,
        "metrics": metrics,
        "metrics_note": "test_acc is the clean test accuracy, for evaluation; no selection criterion reads it",
        "weights": None,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "target_classes": list(preprocessing.classes),
        "image_size": preprocessing.image_size,
        "preprocessing": {
            "image_size": preprocessing.image_size,
            "read": RESIZE,
            "mean": list(preprocessing.mean),
            "std": list(preprocessing.std),
            "normalise": "(x - mean) / std per channel",
            "normalisation": preprocessing.normalisation,
        },
        "classes": [
            {"output": i, "class_id": c, "name": n}
            for i, (c, n) in enumerate(zip(preprocessing.classes, preprocessing.names, strict=True))
        ],
        "config": f"{rank}.yaml",
        "use": f"tuning.export.load_model(FOLDER, rank={rank}).predict([...]) or hesstune predict --model FOLDER "
        f"--rank {rank} IMAGE...",
    }


def _head_weight(model_name: str, weights: dict[str, Any]) -> str:
    """Key of the classifier head's weight in the state dict (timm's ``classifier`` entry)."""
    import timm

    from trainables.models import head_names

    name = head_names(timm.create_model(model_name, pretrained=False, num_classes=2))[0] + ".weight"
    return name if name in weights else next(k for k in reversed(list(weights)) if k.endswith(".weight"))


# -- loading and predicting ----------------------------------------------------------------------------
class Prediction(NamedTuple):
    output: int  # index of the model's output
    class_id: int  # the task's class id
    name: str
    probability: float


@dataclass
class LoadedModel:
    """An exported model in eval mode with its card; inputs are image files or tensors."""

    model: nn.Module
    card: dict[str, Any]
    preprocessing: Preprocessing

    def read_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files as model inputs [N, 3, S, S], read and normalised as the card says."""
        from trainables.data import load_image

        images = []
        for path in paths:
            try:
                images.append(load_image(Path(path), self.preprocessing.image_size))
            except (OSError, ValueError) as exc:  # missing, a folder, not an image, truncated
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ExportError(f"image {str(path)!r} cannot be read ({reason}): give a PNG or JPEG file") from None
        if not images:
            raise ExportError("no image given: name at least one image file")
        return self.preprocessing.normalise(torch.stack(images))

    def probabilities(self, inputs: Sequence[str | Path] | torch.Tensor) -> torch.Tensor:
        """Softmax over the outputs [N, K]; a tensor is taken as already normalised [N, 3, S, S]
        (like a task's ``Split.x``), paths are read with :meth:`read_images`."""
        from trainables.models import predict

        x = inputs if isinstance(inputs, torch.Tensor) else self.read_images(inputs)
        return predict(self.model, x).softmax(1)

    def predict(self, inputs: Sequence[str | Path] | torch.Tensor) -> list[Prediction]:
        """The most probable class of each input, with its probability."""
        probs = self.probabilities(inputs)
        best = probs.argmax(1).tolist()
        pre = self.preprocessing
        return [Prediction(i, pre.classes[i], pre.names[i], float(probs[n, i])) for n, i in enumerate(best)]


def load_model(folder: str | Path, rank: int = 1, refit: bool = False) -> LoadedModel:
    """The rank-``rank`` model of an export folder (``refit``: its refit weights), in eval mode."""
    import timm
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    card_path = folder / f"{rank}.card.json"
    if not card_path.is_file():
        raise ExportError(f"{str(card_path)!r} does not exist: give a folder written by hesstune export (-o DIR)")
    card = json.loads(card_path.read_text())
    name = (card.get("refit") or {}).get("weights") if refit else card.get("weights")
    if not name or not (folder / name).is_file():
        what = f"{rank}.refit.safetensors (export with --refit)" if refit else f"{rank}.safetensors"
        raise ExportError(f"{str(folder)!r} has no {what}: export the sweep again with its checkpoints")
    pre = card["preprocessing"]
    classes = card["classes"]
    preprocessing = Preprocessing(
        int(pre["image_size"]),
        (pre["mean"][0], pre["mean"][1], pre["mean"][2]),
        (pre["std"][0], pre["std"][1], pre["std"][2]),
        pre["normalisation"],
        tuple(int(c["class_id"]) for c in classes),
        tuple(str(c["name"]) for c in classes),
    )
    model = timm.create_model(card["model"], pretrained=False, num_classes=int(card["num_classes"]))
    model.load_state_dict(load_file(str(folder / name)))
    return LoadedModel(model.eval(), card, preprocessing)


# -- the MLflow Model Registry -----------------------------------------------------------------------
def check_registered_model_name(name: str) -> None:
    """Refuse the names MLflow 3.17.2 rejects (``mlflow.utils.validation._validate_model_name``):
    empty, containing ``/`` or ``:``, or not a plain file name (``.``, starting with ``..``)."""
    fix = "use letters, digits, '-', '_' or '.', e.g. hesstune-digits"
    if not name.strip():
        raise ExportError(f"--register {name!r}: the model name is empty; {fix}")
    bad = [c for c in "/:" if c in name]
    if bad:
        raise ExportError(f"--register {name!r}: MLflow model names cannot contain {bad[0]!r}; {fix}")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        raise ExportError(f"--register {name!r}: MLflow refuses names that read as a path; {fix}")


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``uri`` (tracking and registry), then restored."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def register_model(
    uri: str,
    parent_run_id: str,
    folder: str | Path,
    name: str,
    *,
    rank: int = 1,
    refit: bool = False,
    alias: str = CHAMPION,
) -> str:
    """Log the exported rank-``rank`` model (``refit``: its refit weights) as an MLflow PyTorch
    model on the sweep's parent run, register it as a new version of ``name``, move ``alias`` to
    it and tag it with the criterion, its metrics and the trial. Returns the version.

    The model is saved in MLflow's ``pt2`` format (``torch.export``: no pickle, no timm needed to
    load it) and carries the model card, whose preprocessing says how to make its inputs."""
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    check_registered_model_name(name)
    loaded = load_model(folder, rank=rank, refit=refit)
    card = loaded.card
    size = loaded.preprocessing.image_size
    example = np.zeros((2, 3, size, size), dtype=np.float32)  # batch 2: the batch dimension stays dynamic
    with torch.no_grad():
        signature = infer_signature(example, loaded.model(torch.from_numpy(example)).numpy())
    tags = {
        "criterion": card["criterion"],
        "trial_id": card["trial_id"],
        "sweep": card["sweep"],
        "weights": "refit (train ∪ val)" if refit else "trial",
        **{m: _tag(card["metrics"][m]) for m in REGISTRY_TAGS if m in card["metrics"]},
    }
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    # created here, in the sweep's experiment (its artifacts under the sweep's store), rather than in
    # whatever experiment MLflow's fluent API has active; the parent run stays as the sweep left it
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=parent_run_id)
    with _tracking(uri):
        info = mlflow.pytorch.log_model(
            loaded.model,
            name="model",
            signature=signature,
            input_example=example,
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            extra_files=[str(Path(folder) / f"{rank}.card.json")],
            metadata={"hesstune_card": card},
            model_id=logged.model_id,
            run_id=parent_run_id,  # mlflow.models.Model.log's run: the model is listed among its outputs
        )
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def _tag(value: float) -> str:
    return repr(value) if math.isfinite(value) else str(value)
