"""Shared fixtures: tiny random checkpoints of the real architectures, built once per session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (support.py, redis_server.py) import by name

ARCHS = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """{arch: checkpoint dir}; built lazily, once per session."""
    from epd.models.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(arch, str(root / arch), "tiny", seed=0) for arch in ARCHS}


@pytest.fixture(autouse=True)
def _pool_intact(request):
    """A test using an `engine` fixture (an `Engine`) leaves its KV page pool intact."""
    yield
    if "engine" in request.fixturenames:
        request.getfixturevalue("engine").check_integrity()
