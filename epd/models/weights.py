"""Safetensors weights of a Hugging Face checkpoint directory, by their names in the checkpoint.

Handles a single `model.safetensors` and sharded checkpoints (`model.safetensors.index.json`).
`iter_weights` yields each name with a function that reads that tensor, so a process reads only
the tensors it keeps (a decode node never reads the vision tower's); the family maps names to its
modules' (`ModelFamily.weight_name`) and `load_into` copies them in, every parameter exactly once.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open

from epd.layers.parallel import shard_dims, shard_piece


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


def iter_weights(path: str) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(checkpoint name, function reading the tensor) of every tensor of the checkpoint."""
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for raw in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield raw, functools.partial(f.get_tensor, raw)


def load_into(module: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]], strip: str = "") -> None:
    """Copy weights into module parameters by name; every parameter must be covered exactly (a
    tensor-parallel layer's parameter takes this process's piece of the checkpoint's tensor)."""
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers(remove_duplicate=False)))
    shards = shard_dims(module)   # tensor parallelism: this process keeps its piece of those
    seen = set()
    for name, tensor in weights:
        key = name[len(strip):] if strip and name.startswith(strip) else name
        if key not in params:
            raise KeyError(f"checkpoint weight {name!r} has no matching parameter")
        target = params[key]
        if key in shards:
            tensor = shard_piece(tensor, target.shape, shards[key])
        if target.shape != tensor.shape:
            raise ValueError(f"weight {name!r}: checkpoint shape {tuple(tensor.shape)} "
                             f"!= model shape {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
        seen.add(key)
    missing = [n for n, _ in module.named_parameters() if n not in seen]
    if missing:
        raise KeyError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def vlm_weight_name(raw: str, vision_prefixes: tuple[str, ...]) -> str | None:
    """Our name of a tensor of a checkpoint laid out as the Hub's vision-language models are
    (`language_model.model.*`, `language_model.lm_head.weight`, vision modules at the top) or as
    transformers 5 saves them (`model.language_model.*`, `lm_head.weight`, `model.<vision>.*`):
    `language_model.*`, `lm_head.weight`, `vision.<vision>.*`; None for anything else."""
    if raw in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    for prefix in ("language_model.model.", "model.language_model."):
        if raw.startswith(prefix):
            return "language_model." + raw[len(prefix):]
    name = raw[len("model."):] if raw.startswith("model.") else raw
    return "vision." + name if name.startswith(vision_prefixes) else None
