"""The IDX file format of MNIST and Fashion-MNIST, read from local files (never downloaded).

An IDX file is a big-endian header — two zero bytes, a type code (``0x08``: unsigned bytes), the
number of dimensions d — then d 32-bit sizes, then the data. MNIST-style folders hold four of them,
raw or gzipped: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``. Every malformed file is a :class:`ConfigError` naming the file.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from trainables.config import ConfigError

__all__ = ["IDX_FILES", "find_idx_files", "read_idx", "read_idx_split"]

# split → (images, labels) base names; each may also end in ``.gz``
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08


def find_idx_files(root: Path, kind: str) -> dict[str, tuple[Path, Path]]:
    """The four files of an MNIST-style folder (raw preferred over ``.gz``), or one error naming
    every missing file."""
    found: dict[str, list[Path]] = {}
    missing: list[str] = []
    for split, names in IDX_FILES.items():
        for name in names:
            options = [root / name, root / f"{name}.gz"]
            path = next((p for p in options if p.is_file()), None)
            if path is None:
                missing.append(name)
            else:
                found.setdefault(split, []).append(path)
    if missing:
        raise ConfigError(
            f"{kind} folder {str(root)!r} lacks {', '.join(missing)} (raw or .gz): give a folder holding "
            "the four IDX files (for Fashion-MNIST: apt-get install dataset-fashion-mnist)"
        )
    return {split: (paths[0], paths[1]) for split, paths in found.items()}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array of ``ndim`` dimensions; truncated or foreign files are errors."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"IDX file {str(path)!r} cannot be read ({exc}): replace it with an intact copy") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != _UBYTE or raw[3] != ndim:
        raise ConfigError(
            f"IDX file {str(path)!r} has a wrong magic number (expected 0x0000080{ndim}, unsigned bytes in "
            f"{ndim} dimension(s)): it is not an MNIST-style {'image' if ndim == 3 else 'label'} file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"IDX file {str(path)!r} is truncated inside its header: replace it with an intact copy")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ConfigError(
            f"IDX file {str(path)!r} holds {len(raw)} bytes, its header {shape} needs {expected}: "
            "the file is truncated or damaged; replace it with an intact copy"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_split(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W] uint8, labels [N] int64) of one split; their counts must agree."""
    x, y = read_idx(images, 3), read_idx(labels, 1)
    if len(x) != len(y):
        raise ConfigError(
            f"{str(images)!r} holds {len(x)} images but {str(labels)!r} holds {len(y)} labels: "
            "use the image and label files of the same split"
        )
    return x, y.astype(np.int64)
