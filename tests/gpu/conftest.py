"""GPU tests: skipped without CUDA. The 3B checkpoint comes from $EPD_GPU_MODEL_3B when set
(the device run writes it once under /tmp for tests and benchmarks), else it is written here."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def small128(tmp_path_factory) -> str:
    from helpers import small128_checkpoint

    return small128_checkpoint(str(tmp_path_factory.mktemp("small128")))


@pytest.fixture(scope="session")
def model_3b(tmp_path_factory) -> str:
    path = os.environ.get("EPD_GPU_MODEL_3B")
    if path and os.path.isdir(path):
        return path
    from epd.models.tiny_model import write_tiny_model

    return write_tiny_model("qwen2_5_vl", str(tmp_path_factory.mktemp("m3b")), "3b", device="cuda")
