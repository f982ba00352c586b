"""Shared fixtures: tiny random checkpoints of the real architectures, built once per session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (support.py, redis_server.py) import by name

class TinyModels(dict):
    """{arch or "arch:preset": checkpoint dir}, each written on first use, once per session."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, key: str) -> str:
        from epd.models.tiny_model import write_tiny_model

        arch, _, preset = key.partition(":")
        self[key] = write_tiny_model(arch, str(self.root / key.replace(":", "-")), preset or "tiny", seed=0)
        return self[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    return TinyModels(tmp_path_factory.mktemp("models"))


@pytest.fixture(autouse=True)
def _pool_intact(request):
    """A test using an `engine` fixture (an `Engine`) leaves its KV page pool intact."""
    yield
    if "engine" in request.fixturenames:
        request.getfixturevalue("engine").check_integrity()
