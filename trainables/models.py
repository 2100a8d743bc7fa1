"""Models: a timm factory, starting weights, and depth-ordered layer groups.

Starting weights (``ModelConfig.pretrained``): ``source`` pretrains the model once on the
task's source classes (``task.source_classes``; digits 0–4 for the built-in task) and caches it,
with a report of what pretraining bought (docs/transfer.md); ``timm`` reads timm/Hugging Face
cached weights without downloading; ``file:PATH`` loads a safetensors or weights-only torch file;
``none`` is the from-scratch baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import ConfigError, ModelConfig, TaskConfig

__all__ = [
    "LayerGroups",
    "cache_dir",
    "check_model_name",
    "create_model",
    "ensure_source_model",
    "features",
    "head_names",
    "in_head",
    "layer_groups",
    "load_weights",
    "predict",
    "resolve_device",
    "save_weights",
]

# How the ``source`` model is pretrained. The built-in digits task keeps its first recipe (every
# stored digits result was computed from it), whose last batch of an epoch holds 5 of its 901
# images, so BatchNorm's running statistics end each epoch on a tiny batch. Every other task
# drops that incomplete batch (docs/transfer.md).
DIGITS_SOURCE_RECIPE: dict[str, Any] = {"epochs": 30, "lr": 1e-3, "batch_size": 64, "seed": 0, "version": 1}
SOURCE_RECIPE: dict[str, Any] = {
    "epochs": 12,
    "lr": 2e-3,
    "batch_size": 128,
    "seed": 0,
    "schedule": "cosine",
    "drop_last": True,
    "version": 2,
}


def cache_dir() -> Path:
    """``$HESSTUNE_CACHE`` or ``~/.cache/hesstune``."""
    return Path(os.environ.get("HESSTUNE_CACHE", Path.home() / ".cache" / "hesstune")).expanduser()


def check_model_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a timm architecture."""
    import timm

    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name[:4]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown model {name!r}: use a timm architecture name{hint}")


def _timm_model(name: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    import timm

    check_model_name(name)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except Exception as exc:  # timm/hub raise many types when weights are not cached
        if not pretrained:
            raise
        raise ConfigError(
            f"pretrained weights for {name!r} are not in the local timm/Hugging Face cache ({exc}); "
            "cache them beforehand or use model.pretrained=file:PATH"
        ) from None


def _hub_offline() -> None:
    """timm weights come from the local Hugging Face cache, never the network, unless the user set
    ``HF_HUB_OFFLINE=0``. huggingface_hub reads the variable once, when first imported (``import
    timm`` does that, usually before this runs), so its constant is set too: otherwise a missing
    cache entry costs about a minute of retries on a machine without network."""
    if os.environ.setdefault("HF_HUB_OFFLINE", "1") not in ("0", "false", "False"):
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True


def create_model(cfg: ModelConfig, num_classes: int, *, task: TaskConfig | None = None) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head and the configured starting weights
    (``source``: pretrained on ``task``'s source classes, the built-in task by default)."""
    if cfg.pretrained == "timm":
        _hub_offline()
        return _timm_model(cfg.name, num_classes, pretrained=True)
    model = _timm_model(cfg.name, num_classes)
    if cfg.pretrained == "source":
        load_backbone(model, ensure_source_model(cfg.name, task or TaskConfig()))
    elif cfg.pretrained.startswith("file:"):
        load_backbone(model, Path(cfg.pretrained.removeprefix("file:")))
    return model


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (concurrent trials may race on a cache file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors, or a torch file with ``weights_only=True`` (never arbitrary pickles)."""
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {str(path)!r} holds no state dict")
    return state


def load_backbone(model: nn.Module, path: Path) -> None:
    """Load every weight except the classifier head; shapes must match the architecture."""
    state = load_weights(path)
    heads = head_names(model)
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not in_head(k, heads)}
    wrong = [k for k, v in body.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if not in_head(k, heads) and k not in body]
    if wrong or missing:
        what = f"shape mismatch at {wrong[0]}" if wrong else f"missing {missing[0]}"
        raise ConfigError(f"weights in {str(path)!r} do not fit this model ({what}): check model.name")
    model.load_state_dict(body, strict=False)


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier heads: timm's ``classifier`` entry (``fc``, ``head.fc``, or
    several, e.g. ``("head", "head_dist")`` for distilled transformers); ``fc`` when it has none."""
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", {}) or {}
    head = cfg.get("classifier", "fc")
    return tuple(str(h) for h in head) if isinstance(head, list | tuple) else (str(head),)


def in_head(name: str, heads: tuple[str, ...]) -> bool:
    """Whether the parameter or state-dict key ``name`` belongs to one of the ``heads``."""
    return any(name.startswith(head + ".") for head in heads)


# -- the source model --------------------------------------------------------------------------------
def source_recipe(task: TaskConfig) -> dict[str, Any]:
    return DIGITS_SOURCE_RECIPE if task.name == "digits" else SOURCE_RECIPE


def source_key(name: str, task: TaskConfig) -> str:
    """Cache key: model, task (kind and resolved folder), source classes, image size, recipe."""
    from trainables.data import parse_task_name

    kind, path = parse_task_name(task.name)
    where = str(Path(path).expanduser().resolve()) if path else ""
    what = (name, task.image_size, sorted(source_recipe(task).items()), kind, where, task.source_classes)
    return hashlib.sha256(repr(what).encode()).hexdigest()[:12]


def ensure_source_model(name: str, task: TaskConfig, *, log: Callable[[str], None] = print) -> Path:
    """Pretrain ``name`` on the task's source classes once and cache it (with a JSON report next to
    it: source test accuracy, linear probes on the target); later calls reuse the file."""
    kind = task.name.partition(":")[0]
    path = cache_dir() / f"source-{name}-{kind}-{task.image_size}px-{source_key(name, task)}.safetensors"
    if path.is_file():
        return path
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:  # two sweeps starting at once pretrain it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        from trainables.data import load_source_task

        source = load_source_task(task)
        log(
            f"pretraining {name} on the source classes {list(source.classes)} of {task.name} "
            f"({len(source.y)} images), once; cached at {path}"
        )
        tic = time.perf_counter()
        model = _pretrain_source(name, source, source_recipe(task), log=log)
        report = {"seconds": round(time.perf_counter() - tic, 1), **source_report(name, model, source, task)}
        path.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        save_weights(model.state_dict(), path)  # atomic: its presence says the pretraining is done
        log(describe_source_report(report))
    return path


def describe_source_report(report: dict[str, Any]) -> str:
    acc = report.get("source_test_acc")
    source = (
        f"source test accuracy {acc:.3f} on {report['source_test_n']} images"
        if acc is not None
        else ("no held-out source images (the task has no fixed test set)")
    )
    return (
        f"source model pretrained in {report['seconds']:.0f} s: {source}; linear probe on the target "
        f"(clean labels, {report['probe_train_n']} training images): {report['probe_acc']:.3f} with these "
        f"features vs {report['probe_acc_random']:.3f} with a random-init model's"
    )


def _pretrain_source(
    name: str, source: Any, recipe: dict[str, Any], *, log: Callable[[str], None] = lambda _: None
) -> nn.Module:
    gen = torch.Generator().manual_seed(int(recipe["seed"]))
    torch.manual_seed(int(recipe["seed"]))
    model = _timm_model(name, len(source.classes))
    opt = torch.optim.Adam(model.parameters(), lr=float(recipe["lr"]))
    epochs, batch = int(recipe["epochs"]), int(recipe["batch_size"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if recipe.get("schedule") == "cosine" else None
    model.train()
    tic = time.perf_counter()
    for epoch in range(1, epochs + 1):
        batches = torch.randperm(len(source.y), generator=gen).split(batch)
        if recipe.get("drop_last") and len(batches[-1]) < batch:
            batches = batches[:-1]  # a tiny last batch would skew BatchNorm's running statistics
        for idx in batches:
            opt.zero_grad()
            F.cross_entropy(model(source.x[idx]), source.y[idx]).backward()
            opt.step()
        if sched is not None:
            sched.step()
        if epoch in (1, epochs) or epoch % max(epochs // 4, 1) == 0:  # a few lines, not one per epoch
            log(f"  source pretraining: epoch {epoch}/{epochs} ({time.perf_counter() - tic:.0f} s)")
    return model.eval()


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (timm's ``pre_logits``) in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    timm_model: Any = model  # timm's forward_features / forward_head(pre_logits=True)
    try:
        out = [
            timm_model.forward_head(timm_model.forward_features(c.to(device)), pre_logits=True)
            for c in x.split(batch_size)
        ]
        return torch.cat(out).float().cpu()
    finally:
        model.train(was_training)


def source_report(
    name: str, model: nn.Module, source: Any, task: TaskConfig, *, probe_cap: int = 5000
) -> dict[str, Any]:
    """What pretraining bought: the source model's accuracy on held-out source images, and a
    linear probe's clean target accuracy on its features against a random-init model's."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from trainables.config import NoiseConfig
    from trainables.data import load_task

    report: dict[str, Any] = {"source_test_acc": None, "source_test_n": 0}
    if source.test is not None:
        tx, ty = source.test
        with torch.no_grad():
            logits = torch.cat([model.eval()(c) for c in tx.split(512)])
        report.update(source_test_acc=float((logits.argmax(1) == ty).float().mean()), source_test_n=len(ty))
    data = load_task(dataclasses.replace(task, noise=NoiseConfig(kind="none", rate=0.0), train_size=None, val_size=0))
    n = min(len(data.train), probe_cap)
    torch.manual_seed(0)
    random_init = _timm_model(name, len(source.classes))
    report["probe_train_n"] = n
    for key, net in (("probe_acc", model), ("probe_acc_random", random_init)):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        probe.fit(features(net, data.train.x[:n]).numpy(), data.train.clean[:n].numpy())
        report[key] = float(probe.score(features(net, data.test.x).numpy(), data.test.clean.numpy()))
    return report


# -- depth groups ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerGroups:
    """Constrainable weight tensors by depth group (0 = input side) and the head's weights."""

    groups: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]

    def group_of(self) -> dict[str, int]:
        return {name: g for g, names in enumerate(self.groups) for name in names}


def layer_groups(model: nn.Module) -> LayerGroups:
    """Depth-ordered groups of conv/linear weights: timm's ``group_parameters`` under the model's
    coarse ``group_matcher`` (stem, then one group per stage), the heads apart.

    Biases and normalisation parameters are not constrained (docs/measures.md §1), so only weight
    tensors of ≥ 2 dimensions are listed. Models without a matcher form one body group.
    """
    heads = head_names(model)
    weights = [n for n, p in model.named_parameters() if p.ndim >= 2]
    head_weights = tuple(n for n in weights if in_head(n, heads))
    body = [n for n in weights if n not in head_weights]
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return LayerGroups((tuple(body),), head_weights)
    from timm.models import group_parameters

    grouped = group_parameters(model, matcher(coarse=True))  # group id -> names, in depth order
    kept = set(body)
    groups = tuple(tuple(n for n in names if n in kept) for _, names in sorted(grouped.items()))
    return LayerGroups(tuple(g for g in groups if g), head_weights)


# -- running a model -----------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available: use device=cpu or auto")
    return torch.device(name)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Logits in eval mode (BatchNorm running stats); the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return torch.cat([model(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)])
    finally:
        model.train(was_training)
