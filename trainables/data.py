"""Tasks: the built-in ``digits`` transfer task and real image data from local files.

A task yields a :class:`TaskData`: in-memory image tensors per split, the clean labels, the
noisy labels actually used for training/validation, and the noise transition matrix. Nothing is
ever downloaded: ``imagefolder:PATH``, ``cifar10:PATH`` and ``cifar100:PATH`` read local files.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import ConfigError, TaskConfig
from trainables.noise import apply_noise, empirical_transition, pair_transition, symmetric_transition

__all__ = ["Split", "TaskData", "load_source_task", "load_task", "task_names"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Split:
    """One split: images [N, 3, H, W] (normalised), clean labels and the labels used."""

    x: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor  # noisy where noise applies (train, val), clean for test

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def noise_mask(self) -> torch.Tensor:
        return self.labels != self.clean


@dataclass
class TaskData:
    train: Split
    val: Split | None
    test: Split
    test_noisy: torch.Tensor  # a noisy copy of the test labels drawn by the same process
    num_classes: int
    transition: np.ndarray | None  # F[j, k] = P(noisy = k | clean = j); None without noise

    @property
    def realised_noise(self) -> float:
        return float(self.train.noise_mask.float().mean())


@dataclass
class _Pool:
    """All labelled images of a task before splitting, plus an optional fixed test set."""

    x: torch.Tensor
    y: np.ndarray
    num_classes: int
    test_x: torch.Tensor | None = None
    test_y: np.ndarray | None = None


# -- sources ------------------------------------------------------------------------------------
def _digits_images(image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()  # global standardisation, the same for source and target
    return x, digits.target.astype(np.int64)


def _digits_target(_: str, cfg: TaskConfig) -> _Pool:
    x, y = _digits_images(cfg.image_size)
    keep = y >= 5
    return _Pool(x[torch.from_numpy(keep)], y[keep] - 5, 5)


def load_source_task(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The source task of ``digits``: classes 0–4, used once to pretrain the source model."""
    x, y = _digits_images(image_size)
    keep = y < 5
    return x[torch.from_numpy(keep)], torch.from_numpy(y[keep])


def _load_image(path: Path, image_size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    with Image.open(path) as img:
        t = pil_to_tensor(img.convert("RGB"))
    t = resize(t, [image_size], antialias=True)  # shorter side, then a centre square
    return center_crop(t, [image_size, image_size]).float() / 255.0


def _folder_images(root: Path, classes: list[str], image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ConfigError(f"class folder {str(root / name)!r} holds no images: remove it or add images")
        images += [_load_image(p, image_size) for p in files]
        labels += [label] * len(files)
    return torch.stack(images), np.array(labels, dtype=np.int64)


def _class_dirs(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ConfigError(f"image folder {str(root)!r} needs ≥ 2 class sub-folders, found {len(classes)}")
    return classes


def _imagefolder(path: str, cfg: TaskConfig) -> _Pool:
    """``PATH/<class>/*.png``, or ``PATH/train/<class>`` + ``PATH/test/<class>`` (fixed test)."""
    root = _existing_dir(path, "imagefolder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _class_dirs(root / "train")
        x, y = _folder_images(root / "train", classes, cfg.image_size)
        tx, ty = _folder_images(root / "test", classes, cfg.image_size)
        return _normalised(_Pool(x, y, len(classes), tx, ty))
    classes = _class_dirs(root)
    x, y = _folder_images(root, classes, cfg.image_size)
    return _normalised(_Pool(x, y, len(classes)))


def _cifar_batches(root: Path, files: list[str], label_key: bytes) -> tuple[torch.Tensor, np.ndarray]:
    data, labels = [], []
    for name in files:
        with open(root / name, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")  # the official python-pickle format
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(data)).float() / 255.0, np.concatenate(labels)


def _cifar(num_classes: int) -> Callable[[str, TaskConfig], _Pool]:
    sub, train, test, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels")
        if num_classes == 10
        else ("cifar-100-python", ["train"], ["test"], b"fine_labels")
    )

    def load(path: str, cfg: TaskConfig) -> _Pool:
        root = _existing_dir(path, f"cifar{num_classes}")
        root = root / sub if (root / sub).is_dir() else root
        missing = [f for f in train + test if not (root / f).is_file()]
        if missing:
            raise ConfigError(
                f"cifar{num_classes} files missing in {str(root)!r}: {', '.join(missing)}; "
                f"unpack the official python version there (no download at run time)"
            )
        x, y = _cifar_batches(root, train, key)
        tx, ty = _cifar_batches(root, test, key)
        pool = _Pool(_resize(x, cfg.image_size), y, num_classes, _resize(tx, cfg.image_size), ty)
        return _normalised(pool)

    return load


_TASKS: dict[str, Callable[[str, TaskConfig], _Pool]] = {
    "digits": _digits_target,
    "imagefolder": _imagefolder,
    "cifar10": _cifar(10),
    "cifar100": _cifar(100),
}


def task_names() -> list[str]:
    return sorted(_TASKS)


def _existing_dir(path: str, kind: str) -> Path:
    if not path:
        raise ConfigError(f"task {kind} needs a folder: use {kind}:PATH")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{kind} folder {path!r} does not exist: give an existing local folder")
    return root


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _normalised(pool: _Pool) -> _Pool:
    mean = pool.x.mean(dim=(0, 2, 3), keepdim=True)
    std = pool.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    pool.x = (pool.x - mean) / std
    if pool.test_x is not None:
        pool.test_x = (pool.test_x - mean) / std
    return pool


def parse_task_name(name: str) -> tuple[str, str]:
    kind, _, path = name.partition(":")
    if kind not in _TASKS:
        raise ConfigError(f"unknown task {name!r}: use one of digits, imagefolder:PATH, cifar10:PATH, cifar100:PATH")
    if kind == "digits" and path:
        raise ConfigError(f"task {name!r}: digits takes no path")
    return kind, path


# -- splitting and noise ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_task(cfg: TaskConfig) -> TaskData:
    """Load, split (seeded by ``cfg.split_seed``) and corrupt the labels of a task.

    Cached per process for the last config (reused Ray actors run many trials on the same task:
    decoding an image folder once is enough). The returned tensors are shared: never modify them.
    """
    cfg.validate()
    kind, path = parse_task_name(cfg.name)
    pool = _TASKS[kind](path, cfg)
    _check_classes(pool.y, pool.num_classes, cfg.name)
    rng = np.random.default_rng(cfg.split_seed)
    parts = _split_indices(pool, cfg, rng)
    weak = _weak_scores(pool, cfg, rng) if cfg.noise.kind == "correlated" else None
    return _assemble(pool, parts, cfg, rng, weak)


def _check_classes(y: np.ndarray, num_classes: int, name: str) -> None:
    counts = np.bincount(y, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ConfigError(f"task {name!r}: class {int(empty[0])} has no samples; every class needs data")


def _split_indices(pool: _Pool, cfg: TaskConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    order = rng.permutation(len(pool.y))
    n = len(order)
    n_test = 0 if pool.test_x is not None else round(cfg.test_fraction * n)
    n_val = round(cfg.val_fraction * n)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    if cfg.train_size is not None:
        if cfg.train_size > len(parts["train"]):
            raise ConfigError(f"task.train_size={cfg.train_size} exceeds the {len(parts['train'])} training samples")
        parts["train"] = parts["train"][: cfg.train_size]
    if cfg.merge_val:
        parts["train"] = np.concatenate([parts["train"], parts["val"]])
        parts["val"] = parts["val"][:0]
    needed = ["train"] + (["test"] if pool.test_x is None else [])
    for split in needed:
        if len(parts[split]) == 0:
            raise ConfigError(f"task {cfg.name!r} leaves the {split} split empty: use more data or other fractions")
    return parts


def _weak_scores(pool: _Pool, cfg: TaskConfig, rng: np.random.Generator) -> np.ndarray:
    """Class probabilities of a deliberately weak model (few-step logistic regression on 8×8 thumbnails)."""
    from sklearn.linear_model import LogisticRegression

    def feats(x: torch.Tensor) -> np.ndarray:
        return F.adaptive_avg_pool2d(x, 4).flatten(1).numpy()

    fit = rng.choice(len(pool.y), size=max(len(pool.y) // 4, 2 * pool.num_classes), replace=False)
    model = LogisticRegression(C=0.05, max_iter=50)
    model.fit(feats(pool.x[fit]), pool.y[fit])
    scores = model.predict_proba(feats(pool.x))
    if pool.test_x is not None:
        scores = np.concatenate([scores, model.predict_proba(feats(pool.test_x))])
    return np.asarray(scores)


def _assemble(
    pool: _Pool, parts: dict[str, np.ndarray], cfg: TaskConfig, rng: np.random.Generator, weak: np.ndarray | None
) -> TaskData:
    k = pool.num_classes

    def noisy(idx: np.ndarray, y: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        return apply_noise(y, k, cfg.noise, rng, None if scores is None else scores[idx])

    def split(idx: np.ndarray, corrupt: bool) -> Split:
        y = pool.y[idx]
        labels = noisy(idx, y, weak) if corrupt else y
        return Split(pool.x[torch.from_numpy(idx)], torch.from_numpy(y), torch.from_numpy(labels))

    train = split(parts["train"], corrupt=True)
    val = split(parts["val"], corrupt=cfg.noise.noisy_val) if len(parts["val"]) else None
    if pool.test_x is not None and pool.test_y is not None:
        test_idx = np.arange(len(pool.test_y))
        test = Split(pool.test_x, torch.from_numpy(pool.test_y), torch.from_numpy(pool.test_y))
        test_scores = None if weak is None else weak[len(pool.y) :]
    else:
        test_idx, test_scores = parts["test"], weak
        test = split(test_idx, corrupt=False)
    test_noisy = torch.from_numpy(noisy(test_idx, test.clean.numpy(), test_scores))
    return TaskData(train, val, test, test_noisy, k, _transition(cfg, k, train))


def _transition(cfg: TaskConfig, k: int, train: Split) -> np.ndarray | None:
    if cfg.noise.kind == "none" or cfg.noise.rate == 0.0:
        return None
    if cfg.noise.kind == "symmetric":
        return symmetric_transition(k, cfg.noise.rate)
    if cfg.noise.kind == "pair":
        return pair_transition(k, cfg.noise.rate)
    return empirical_transition(train.clean.numpy(), train.labels.numpy(), k)
