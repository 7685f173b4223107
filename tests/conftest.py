"""Shared fixtures. Tests use real components; GPU tests skip only where no CUDA device exists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
requires_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
    reason="needs the CUDA compiler nvcc (not installed here)",
)


@pytest.fixture(scope="session")
def conv_vectors() -> dict:
    return torch.load(DATA / "adaptive_conv_vectors.pt", weights_only=True)


@pytest.fixture(scope="session")
def jbu_vectors() -> dict:
    return torch.load(DATA / "jbu_vectors_small.pt", weights_only=True)
