"""Session-wide test settings: a private model cache, no MLflow telemetry, few CPU threads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``HESSTUNE_CACHE`` at a session tmp dir and keep torch to one thread (shared CPUs)."""
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
