"""Load safetensors weights from a Hugging Face checkpoint directory by their HF names.

Handles a single `model.safetensors` and sharded checkpoints (`model.safetensors.index.json`),
and both naming schemes in circulation for the Qwen2-VL family: the Hub's (`visual.*`,
`model.layers.*`) and transformers 5's (`model.visual.*`, `model.language_model.layers.*`).
Names are normalised to `visual.*` for the vision tower and `language_model.*` / `lm_head.*`
for the text model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {path!r}")
    return [os.path.join(path, f) for f in found]


def normalize_name(name: str) -> str:
    """Map any supported checkpoint naming to `visual.*`, `language_model.*` or `lm_head.*`."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("visual.") or name.startswith("lm_head."):
        return name
    if name.startswith("model.language_model."):
        return "language_model." + name[len("model.language_model."):]
    if name.startswith("model."):
        return "language_model." + name[len("model."):]
    return name


def iter_weights(path: str, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (normalised name, tensor) for every weight whose normalised name starts with prefix."""
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for raw in f.keys():  # noqa: SIM118 - safe_open is not a dict
                name = normalize_name(raw)
                if name.startswith(prefix):
                    yield name, f.get_tensor(raw)


def load_into(module: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]], strip: str = "") -> None:
    """Copy weights into module parameters by name; every parameter must be covered exactly."""
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers(remove_duplicate=False)))
    seen = set()
    for name, tensor in weights:
        key = name[len(strip):] if strip and name.startswith(strip) else name
        if key not in params:
            raise KeyError(f"checkpoint weight {name!r} has no matching parameter")
        target = params[key]
        if target.shape != tensor.shape:
            raise ValueError(f"weight {name!r}: checkpoint shape {tuple(tensor.shape)} "
                             f"!= model shape {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
        seen.add(key)
    missing = [n for n, _ in module.named_parameters() if n not in seen]
    if missing:
        raise KeyError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
