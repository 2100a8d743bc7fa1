"""Models: a timm factory, starting weights, and depth-ordered layer groups.

Starting weights (``ModelConfig.pretrained``): ``source`` pretrains the model once on the
``digits`` source task (classes 0–4) and caches it; ``timm`` reads timm/Hugging Face cached
weights without downloading; ``file:PATH`` loads a safetensors or weights-only torch file;
``none`` is the from-scratch baseline.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import ConfigError, ModelConfig

__all__ = [
    "LayerGroups",
    "cache_dir",
    "check_model_name",
    "create_model",
    "ensure_source_model",
    "layer_groups",
    "load_weights",
    "save_weights",
]

SOURCE_RECIPE = {"epochs": 30, "lr": 1e-3, "batch_size": 64, "seed": 0, "version": 1}


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


def create_model(cfg: ModelConfig, num_classes: int, *, image_size: int = 32) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head and the configured starting weights."""
    if cfg.pretrained == "timm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return _timm_model(cfg.name, num_classes, pretrained=True)
    model = _timm_model(cfg.name, num_classes)
    if cfg.pretrained == "source":
        load_backbone(model, ensure_source_model(cfg.name, image_size))
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
    head = head_name(model)
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    wrong = [k for k, v in body.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if not k.startswith(head + ".") and k not in body]
    if wrong or missing:
        what = f"shape mismatch at {wrong[0]}" if wrong else f"missing {missing[0]}"
        raise ConfigError(f"weights in {str(path)!r} do not fit this model ({what}): check model.name")
    model.load_state_dict(body, strict=False)


def head_name(model: nn.Module) -> str:
    """Module name of the classifier head (timm's ``classifier`` entry, e.g. ``fc`` or ``head.fc``)."""
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", {}) or {}
    head = cfg.get("classifier", "fc")
    return head[0] if isinstance(head, list | tuple) else str(head)


# -- the built-in source model --------------------------------------------------------------------
def ensure_source_model(name: str, image_size: int, *, log: Callable[[str], None] = print) -> Path:
    """Pretrain ``name`` on digits 0–4 once and cache it; later calls reuse the file."""
    key = hashlib.sha256(repr((name, image_size, sorted(SOURCE_RECIPE.items()))).encode()).hexdigest()[:12]
    path = cache_dir() / f"source-{name}-{image_size}px-{key}.safetensors"
    if path.is_file():
        return path
    log(f"pretraining {name} on the digits source task (classes 0–4), once; cached at {path}")
    save_weights(_pretrain_source(name, image_size).state_dict(), path)
    return path


def _pretrain_source(name: str, image_size: int) -> nn.Module:
    from trainables.data import load_source_task

    x, y = load_source_task(image_size)
    gen = torch.Generator().manual_seed(int(SOURCE_RECIPE["seed"]))
    torch.manual_seed(int(SOURCE_RECIPE["seed"]))
    model = _timm_model(name, 5)
    opt = torch.optim.Adam(model.parameters(), lr=float(SOURCE_RECIPE["lr"]))
    batch = int(SOURCE_RECIPE["batch_size"])
    model.train()
    for _ in range(int(SOURCE_RECIPE["epochs"])):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


# -- depth groups ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerGroups:
    """Constrainable weight tensors by depth group (0 = input side) and the head's weights."""

    groups: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]

    def group_of(self) -> dict[str, int]:
        return {name: g for g, names in enumerate(self.groups) for name in names}


def layer_groups(model: nn.Module) -> LayerGroups:
    """Depth-ordered groups of conv/linear weights from timm's coarse ``group_matcher``.

    Biases and normalisation parameters are not constrained (SPEC §3.1), so only weight tensors
    of ≥ 2 dimensions are listed. Models without a matcher form one body group.
    """
    head = head_name(model)
    weights = [n for n, p in model.named_parameters() if p.ndim >= 2]
    head_weights = tuple(n for n in weights if n.startswith(head + "."))
    body = [n for n in weights if n not in head_weights]
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return LayerGroups((tuple(body),), head_weights)
    ids = {n: _group_id(n, matcher(coarse=True)) for n in body}
    ordered = sorted(set(ids.values()))
    groups = tuple(tuple(n for n in body if ids[n] == gid) for gid in ordered)
    return LayerGroups(groups, head_weights)


def _group_id(name: str, spec: dict[str, object]) -> tuple[int, ...]:
    """Rank of a parameter under a timm matcher dict: stem first, then block indices."""
    for rank, pattern in enumerate(spec.values()):
        for regex in pattern if isinstance(pattern, list | tuple) else [pattern]:
            regex = regex[0] if isinstance(regex, tuple) else regex
            match = re.match(str(regex), name)
            if match:
                return (rank, *(int(g) for g in match.groups() if g is not None and g.isdigit()))
    return (len(spec),)
