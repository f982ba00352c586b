"""The registry of model families: a checkpoint's `model_type` -> the package that serves it.

One line per model_type. Each package (`epd/models/<family>/`) exposes `FAMILY` (its
`epd.models.family.ModelFamily`), `PRESETS` and `write_tiny` (random checkpoints for tests and
benchmarks). Packages are imported on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "qwen2_vl": "epd.models.qwen2_vl",
    "qwen2_5_vl": "epd.models.qwen2_vl",
    "llava": "epd.models.llava",
    "llava_next": "epd.models.llava",
    "llava_onevision": "epd.models.llava",
    "mllama": "epd.models.mllama",
    "llama4": "epd.models.llama4",
}


def family_module(model_type: str | None) -> ModuleType:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def family_class(model_type: str | None) -> type:
    """The `ModelFamily` subclass serving checkpoints of `model_type`."""
    return family_module(model_type).FAMILY


def tiny_archs() -> tuple[str, ...]:
    """What `epd tiny-model ARCH` builds: every registered model_type."""
    return tuple(FAMILIES)


def preset_text_dims(arch: str, preset: str) -> dict:
    """The text model's config.json fields of `epd tiny-model ARCH --preset PRESET` (benchmarks
    size buffers by them without writing a checkpoint)."""
    return family_module(arch).text_dims(arch, preset)
