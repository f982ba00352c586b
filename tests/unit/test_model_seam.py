"""The model seam holds: the engine, the nodes, the router, kv_transfer and deploy import nothing
from a family package (`epd.models.<family>`), and no identifier in their code names a family
concept (patch grids, merge sizes, M-RoPE, anyres). A family is its package plus registry lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from epd.models import FAMILIES, family_class, family_module

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ["epd/engine", "epd/node", "epd/layers", "epd/kernels", "epd/protocol.py", "epd/config.py", "encoder_node",
           "prefill_node", "decode_node", "router", "kv_transfer", "deploy"]
FAMILY_PACKAGES = sorted({module for module in FAMILIES.values()})
CONCEPTS = re.compile(r"grid_thw|mrope|spatial_merge|merge_size|anyres|pinpoint|image_newline", re.IGNORECASE)


def _files() -> list[Path]:
    out = []
    for entry in OUTSIDE:
        path = ROOT / entry
        out += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    return out


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _identifiers(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, ast.arg | ast.keyword) and node.arg:
            names.append(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            names.append(node.name)
    return names


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_family_import_or_concept_outside_the_models(path):
    tree = ast.parse(path.read_text())
    bad = [name for name in _imports(tree) if any(name == pkg or name.startswith(pkg + ".") for pkg in FAMILY_PACKAGES)]
    assert not bad, f"{path.name} imports a family package: {bad}"
    named = sorted({n for n in _identifiers(tree) if CONCEPTS.search(n)})
    assert not named, f"{path.name} names family concepts: {named}"


def test_every_registered_family_provides_the_contract():
    for model_type in FAMILIES:
        module, cls = family_module(model_type), family_class(model_type)
        assert callable(module.write_tiny) and module.PRESETS[0] == "tiny"
        for method in ("build_lm", "build_vision", "image_processor", "weight_name", "reference_vision"):
            assert getattr(cls, method) is not getattr(cls.__mro__[-2], method, None), f"{model_type}: {method}"


@pytest.mark.parametrize("role", ["encoder_node", "prefill_node", "decode_node"])
def test_nodes_drive_the_engine_through_role_operations(role):
    """No node reaches into the engine's scheduler, runner, KV pool or private methods."""
    reached = []
    for path in sorted((ROOT / role).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            owner = getattr(node.value, "attr", None) or getattr(node.value, "id", None)
            if owner == "core" and (node.attr in ("scheduler", "runner", "kv") or node.attr.startswith("_")):
                reached.append(f"{path.name}:{node.lineno} core.{node.attr}")
    assert not reached, reached
