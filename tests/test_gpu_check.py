"""benchmarks/gpu_check.py: the Hessian measures on CUDA against the CPU. CI has no GPU, so the
same code runs there with --device cpu (its agreement with itself must be exact); on a machine
with a GPU the CUDA test below runs too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def _keys(text: str) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in (line.split(": ") for line in text.splitlines() if ": " in line and " " not in line.split(": ")[0])
    }


def test_cpu_run_prints_exact_agreement_and_the_cost_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu", "--samples", "64", "--repeats", "2"]) == 0
    keys = _keys(capsys.readouterr().out)
    assert keys["agree_tf32_on"] == 0 and keys["agree_tf32_off"] == 0  # same device, same generators
    assert 1 < keys["hvp_over_grad"] < keys["lone_hvp_over_grad"] and keys["measure_over_floor"] > 0
    assert not any(key.endswith("memory_over_step") for key in keys)  # device memory: CUDA only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_cuda_without_a_gpu_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "CUDA is not available: use --device cpu" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_measures_on_cuda_agree_with_the_cpu() -> None:
    result = gpu_check.agreement(torch.device("cuda"), 128)
    assert result["agree_tf32_off"] < 1e-3, result
