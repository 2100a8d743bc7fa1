"""Tasks: the built-in ``digits`` transfer task and real image data from local files.

A task yields a :class:`TaskData`: in-memory image tensors per split, the clean labels, the
noisy labels actually used for training/validation, and the injected noise's transition matrix.
Nothing is ever downloaded: ``fashion-mnist[:PATH]``, ``mnist:PATH`` (IDX files),
``imagefolder:PATH``, ``cifar10:PATH`` and ``cifar100:PATH`` read local files.

Every task has a class layout (``task.source_classes`` / ``task.target_classes``): the target
classes are fine-tuned on (relabelled 0..T−1 in the order given), the source classes pretrain the
``--pretrained source`` model (:func:`load_source_task`). ``digits``, ``mnist`` and
``fashion-mnist`` default to source 0–4 and target 5–9; other tasks to no source and every class
as target. A fixed test set (IDX, CIFAR, ``imagefolder`` with ``train/`` and ``test/``) keeps
only its target-class images.
"""

from __future__ import annotations

import functools
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import ConfigError, TaskConfig
from trainables.idx import find_idx_files, read_idx_split
from trainables.noise import apply_noise, empirical_transition, pair_transition, symmetric_transition

__all__ = [
    "FASHION_MNIST_DIR",
    "Preprocessing",
    "SourceData",
    "Split",
    "TaskData",
    "class_layout",
    "load_image",
    "load_source_task",
    "load_task",
    "task_names",
    "task_preprocessing",
]

# where Debian's dataset-fashion-mnist package installs the four IDX files (``fashion-mnist`` alone)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

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


@dataclass(frozen=True)
class Preprocessing:
    """What a model trained on a task expects of an image, and what its outputs mean: enough to
    use the model without the data set (the model card records it, docs/design.md).

    An image file becomes a model input as :func:`load_image` reads it (RGB, values / 255, the
    shorter side resized to ``image_size``, a centre square), then ``(x − mean) / std`` per
    channel. ``classes[i]`` is the task's class id of output ``i``, ``names[i]`` its name."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalisation: str  # how the task computed mean and std
    classes: tuple[int, ...]
    names: tuple[str, ...]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x − mean) / std`` for images [N, 3, H, W] with values in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass
class TaskData:
    train: Split
    val: Split | None
    test: Split
    test_noisy: torch.Tensor  # a noisy copy of the test labels drawn by the same process
    num_classes: int
    # F[j, k] = P(noisy = k | clean = j) of the noise hesstune injected; None without injected
    # noise. Training and selection read the run's F (trainables.transition), never this directly.
    transition: np.ndarray | None
    preprocessing: Preprocessing | None = None  # None for tasks built in memory (tests, benchmarks)

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
    # the normalisation applied to x and test_x (per channel) and how it was computed
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    normalisation: str = ""
    names: tuple[str, ...] = ()  # a name per class id; the id itself where the task has none


# -- sources ------------------------------------------------------------------------------------
def _digits_images(image_size: int) -> tuple[torch.Tensor, np.ndarray, float, float]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    mean, std = x.mean(), x.std()
    x = (x - mean) / std  # global standardisation, the same for source and target
    return x, digits.target.astype(np.int64), float(mean), float(std)


def _digits(_: str, cfg: TaskConfig) -> _Pool:
    x, y, mean, std = _digits_images(cfg.image_size)
    how = "one global mean and std of all digits images (sklearn's 0–16 values / 16), grey in 3 channels"
    return _Pool(x, y, 10, mean=_rgb(mean), std=_rgb(std), normalisation=how, names=_ids(10))


def _rgb(value: float | Sequence[float]) -> tuple[float, float, float]:
    """A per-channel triple: one global value repeated, or three channel values."""
    a, b, c = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    return a, b, c


def _ids(n: int) -> tuple[str, ...]:
    return tuple(str(c) for c in range(n))


# names of the classes of the IDX data sets (the files carry none)
FASHION_MNIST_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@functools.lru_cache(maxsize=1)
def _idx_pool(root: Path, kind: str, image_size: int) -> _Pool:
    """All 70,000 (or however many) images of an MNIST-style folder, standardised by the training
    images' mean and std (the same transform for source and target), one channel expanded to three."""
    files = find_idx_files(root, kind)
    x, y = read_idx_split(*files["train"])
    tx, ty = read_idx_split(*files["test"])
    if x.shape[1:] != tx.shape[1:]:
        raise ConfigError(f"{kind} folder {str(root)!r}: train images are {x.shape[1:]}, test images {tx.shape[1:]}")
    num_classes = max(10, int(max(y.max(initial=0), ty.max(initial=0))) + 1)  # MNIST-style: 10 classes

    def images(raw: np.ndarray) -> torch.Tensor:
        return _resize(torch.from_numpy(raw.copy()).unsqueeze(1).float() / 255.0, image_size)

    train, test = images(x), images(tx)
    mean, std = train.mean(), train.std().clamp_min(1e-6)
    rgb = (-1, 3, -1, -1)  # a view: one channel's memory for timm's three input channels
    names = FASHION_MNIST_NAMES if kind == "fashion-mnist" and num_classes == 10 else _ids(num_classes)
    return _Pool(
        ((train - mean) / std).expand(rgb),
        y,
        num_classes,
        ((test - mean) / std).expand(rgb),
        ty,
        mean=_rgb(float(mean)),
        std=_rgb(float(std)),
        normalisation="one global mean and std of the training images (grey, repeated in 3 channels)",
        names=names,
    )


# IDX tasks usable without a path, and the folder they then read
IDX_DEFAULT_DIRS: dict[str, Path] = {"fashion-mnist": FASHION_MNIST_DIR}


def _idx(kind: str) -> Callable[[str, TaskConfig], _Pool]:
    def load(path: str, cfg: TaskConfig) -> _Pool:
        default = IDX_DEFAULT_DIRS.get(kind)
        if not path and default is not None:
            if not default.is_dir():
                raise ConfigError(
                    f"task {kind} reads {default}, which does not exist: apt-get install dataset-fashion-mnist, "
                    f"or use {kind}:PATH with a folder holding the four IDX files"
                )
            return _idx_pool(default.resolve(), kind, cfg.image_size)
        return _idx_pool(_existing_dir(path, kind).resolve(), kind, cfg.image_size)

    return load


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """An image file as the ``imagefolder`` task reads it: RGB [3, S, S], values in [0, 1]."""
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
        images += [load_image(p, image_size) for p in files]
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
        return _normalised(_Pool(x, y, len(classes), tx, ty, names=tuple(classes)))
    classes = _class_dirs(root)
    x, y = _folder_images(root, classes, cfg.image_size)
    return _normalised(_Pool(x, y, len(classes), names=tuple(classes)))


def _cifar_batches(root: Path, files: list[str], label_key: bytes) -> tuple[torch.Tensor, np.ndarray]:
    data, labels = [], []
    for name in files:
        with open(root / name, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")  # the official python-pickle format
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(data)).float() / 255.0, np.concatenate(labels)


def _cifar_names(path: Path, key: bytes, num_classes: int) -> tuple[str, ...]:
    """Class names from the data set's meta file; the class ids where it is absent or unreadable."""
    try:
        with open(path, "rb") as fh:
            names = [n.decode() for n in pickle.load(fh, encoding="bytes")[key]]
    except (OSError, KeyError, TypeError, AttributeError, pickle.UnpicklingError):
        return _ids(num_classes)
    return tuple(names) if len(names) == num_classes else _ids(num_classes)


def _cifar(num_classes: int) -> Callable[[str, TaskConfig], _Pool]:
    sub, train, test, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels")
        if num_classes == 10
        else ("cifar-100-python", ["train"], ["test"], b"fine_labels")
    )
    meta, names_key = ("batches.meta", b"label_names") if num_classes == 10 else ("meta", b"fine_label_names")

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
        pool.names = _cifar_names(root / meta, names_key, num_classes)
        return _normalised(pool)

    return load


_TASKS: dict[str, Callable[[str, TaskConfig], _Pool]] = {
    "digits": _digits,
    "mnist": _idx("mnist"),
    "fashion-mnist": _idx("fashion-mnist"),
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
    pool.mean, pool.std = _rgb(mean.flatten().tolist()), _rgb(std.flatten().tolist())
    pool.normalisation = "per-channel mean and std of the training pool"
    pool.names = pool.names or _ids(pool.num_classes)
    return pool


TASK_HELP = "digits, fashion-mnist[:PATH], mnist:PATH, imagefolder:PATH, cifar10:PATH or cifar100:PATH"

# (source, target) classes of tasks that have a default transfer layout
_DEFAULT_LAYOUT: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    kind: ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)) for kind in ("digits", "mnist", "fashion-mnist")
}


def parse_task_name(name: str) -> tuple[str, str]:
    kind, _, path = name.partition(":")
    if kind not in _TASKS:
        raise ConfigError(f"unknown task {name!r}: use one of {TASK_HELP}")
    if kind == "digits" and path:
        raise ConfigError(f"task {name!r}: digits takes no path")
    return kind, path


def class_layout(cfg: TaskConfig, num_classes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(source, target) classes of the task: the config's, else the task's default."""
    kind, _ = parse_task_name(cfg.name)
    default_source, default_target = _DEFAULT_LAYOUT.get(kind, ((), ()))
    source = cfg.source_classes if cfg.source_classes is not None else default_source
    if cfg.target_classes is not None:
        target = cfg.target_classes
    else:
        target = default_target or tuple(c for c in range(num_classes) if c not in source)
    for key, classes in (("source_classes", source), ("target_classes", target)):
        wrong = [c for c in classes if not 0 <= c < num_classes]
        if wrong:
            raise ConfigError(
                f"task.{key} lists class {wrong[0]}, which task {cfg.name!r} does not have: "
                f"its classes are 0–{num_classes - 1}"
            )
    if len(target) < 2:
        raise ConfigError(f"task.target_classes={list(target)}: fine-tuning needs at least 2 target classes")
    return source, target


def _restrict(pool: _Pool, classes: Sequence[int], role: str, name: str) -> _Pool:
    """The images of ``classes`` only, relabelled 0..len−1 in the order given; every class needs data."""
    remap = np.full(pool.num_classes, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    counts = np.bincount(pool.y, minlength=pool.num_classes)
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise ConfigError(f"task {name!r}: {role} class {empty[0]} has no images; list only classes with data")
    keep = remap[pool.y] >= 0
    out = _Pool(_take(pool.x, keep), remap[pool.y[keep]], len(classes))
    if pool.test_x is not None and pool.test_y is not None:
        test_keep = remap[pool.test_y] >= 0
        out.test_x, out.test_y = _take(pool.test_x, test_keep), remap[pool.test_y[test_keep]]
    return out


def _take(x: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """``x[mask]``; a grey image expanded to three channels (IDX) stays one channel in memory."""
    if x.shape[1] == 3 and x.stride(1) == 0:
        return x[:, :1][torch.from_numpy(mask)].expand(-1, 3, -1, -1)
    return x[torch.from_numpy(mask)]


@dataclass
class SourceData:
    """The source classes of a task (relabelled 0..S−1): what ``--pretrained source`` trains on;
    ``test`` is the fixed test set's source images (None when the task has no fixed test set)."""

    x: torch.Tensor
    y: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor] | None
    classes: tuple[int, ...]


def load_source_task(cfg: TaskConfig) -> SourceData:
    """The task's source classes, used once to pretrain the source model."""
    cfg.validate()
    kind, path = parse_task_name(cfg.name)
    pool = _TASKS[kind](path, cfg)
    source, _ = class_layout(cfg, pool.num_classes)
    if not source:
        raise ConfigError(
            f"task {cfg.name!r} has no source classes to pretrain on: set task.source_classes "
            "(e.g. --set task.source_classes=[0,1,2]) or use --pretrained timm, none or file:PATH"
        )
    part = _restrict(pool, source, "source", cfg.name)
    test = None if part.test_x is None or part.test_y is None else (part.test_x, torch.from_numpy(part.test_y))
    return SourceData(part.x, torch.from_numpy(part.y), test, source)


# -- splitting and noise ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_task(cfg: TaskConfig) -> TaskData:
    """Load, split (seeded by ``cfg.split_seed``) and corrupt the labels of a task.

    Cached per process for the last config (reused Ray actors run many trials on the same task:
    decoding an image folder once is enough). The returned tensors are shared: never modify them.
    """
    cfg.validate()
    kind, path = parse_task_name(cfg.name)
    full = _TASKS[kind](path, cfg)
    _, target = class_layout(cfg, full.num_classes)
    pool = _restrict(full, target, "target", cfg.name)
    rng = np.random.default_rng(cfg.split_seed)
    parts = _split_indices(pool, cfg, rng)
    weak = _weak_scores(pool, cfg, rng) if cfg.noise.kind == "correlated" else None
    data = _assemble(pool, parts, cfg, rng, weak)
    names = tuple(full.names[c] if full.names else str(c) for c in target)
    data.preprocessing = Preprocessing(cfg.image_size, full.mean, full.std, full.normalisation, target, names)
    return data


def task_preprocessing(cfg: TaskConfig) -> Preprocessing:
    """The preprocessing and class meaning of a task's model inputs and outputs, with the numbers
    the task's loader computed (:func:`load_task`, cached)."""
    preprocessing = load_task(cfg).preprocessing
    assert preprocessing is not None  # load_task always sets it
    return preprocessing


def _split_indices(pool: _Pool, cfg: TaskConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    order = rng.permutation(len(pool.y))
    n = len(order)
    n_test = 0 if pool.test_x is not None else round(cfg.test_fraction * n)
    n_val = cfg.val_size if cfg.val_size is not None else round(cfg.val_fraction * n)
    if n_test + n_val >= n:
        raise ConfigError(
            f"task {cfg.name!r}: {n_val} validation images (task.val_size/val_fraction) leave none of its {n} "
            "target images for training: use a smaller validation split"
        )
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
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def feats(x: torch.Tensor) -> np.ndarray:
        return F.adaptive_avg_pool2d(x, 4).flatten(1).numpy()

    fit = rng.choice(len(pool.y), size=max(len(pool.y) // 4, 2 * pool.num_classes), replace=False)
    model = LogisticRegression(C=0.05, max_iter=50)
    with warnings.catch_warnings():  # deliberately weak: 50 iterations need not converge
        warnings.simplefilter("ignore", ConvergenceWarning)
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
