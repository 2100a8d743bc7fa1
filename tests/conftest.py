"""Session-wide test settings: a private model cache, no MLflow telemetry, few CPU threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# huggingface_hub reads this when first imported, and test modules import timm (and with it the hub)
# while pytest collects them, before any fixture runs: set here, a lookup of weights that are not in
# the local cache fails at once instead of retrying a network this machine does not have.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``HESSTUNE_CACHE`` at a session tmp dir and keep torch to one thread (shared CPUs).
    The xdist workers share one cache (the source model is pretrained once, under a lock)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        cache = tmp_path_factory.getbasetemp().parent / "hesstune-cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("hesstune-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("HESSTUNE_CACHE", str(cache))
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield cache
    torch.set_num_threads(threads)
    mp.undo()


def write_idx_folder(
    root: Path, *, train: int = 120, test: int = 60, classes: int = 10, side: int = 8, gz: bool = True, seed: int = 0
) -> Path:
    """An MNIST-style folder of the four IDX files (gzipped or raw): class c's images are a bright
    square in a class-specific place plus noise, so the classes are learnable."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % classes).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, side, side)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 4)
            images[i, 2 * r : 2 * r + 2, 2 * q : 2 * q + 2] = 255
        for name, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            data = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
            path = root / (name + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(data) if gz else data)
    return root


# The suite runs on two pytest-xdist workers, a file at a time each (--dist loadfile: a module's
# fixtures, such as a shared sweep, are built once). Workers take files in collection order, so
# the longest files go first and the short ones fill in at the end; the outage test is long but
# mostly waits for a stopped server, which leaves the CPUs to the other worker.
LONGEST_FIRST = ("test_outage.py", "test_sweep.py", "test_faults.py", "test_cluster.py", "test_many_writers.py")
# (pyproject's addopts pass --no-loadscope-reorder: by default xdist would order files by test count)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
