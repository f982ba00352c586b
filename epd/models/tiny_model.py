"""`epd tiny-model ARCH OUT_DIR [--preset NAME] [--seed N]`: random checkpoints of real architectures.

Each family's `write_tiny` writes a complete Hugging Face checkpoint directory: `config.json`,
`generation_config.json`, safetensors weights named as on the Hub (sharded with an index above
4 GiB), a tokenizer with the model's special tokens and chat template, and the image processor
config; this module holds what they share. Weights are drawn so activations stay O(1) through the
stack and the logits have a spread of a few units, so greedy decoding changes token from step to
step and near-ties (which would make float comparisons flaky) are rare.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file

SHARD_BYTES = 4 << 30


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator, device: str) -> torch.Tensor:
    """Scales chosen to keep activations O(1) and logits spread by a few units."""
    if len(shape) == 1 and name.endswith("weight"):   # norms
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen, device=device)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen, device=device)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod().item())) if len(shape) > 1 else shape[0]
    scale = 3.0 if name == "lm_head.weight" else 1.0
    return torch.randn(shape, generator=gen, device=device) * (scale / fan_in**0.5)


def random_state_dict(hf_config: Any, seed: int, device: str, dtype: torch.dtype,
                      rename: Callable[[str], str] = lambda name: name) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of transformers' model of `hf_config`, under `rename(name)`
    (the checkpoint's naming)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, meta in model.state_dict().items():
        if name == "lm_head.weight" and hf_config.tie_word_embeddings:
            continue
        out[rename(name)] = _random_tensor(name, meta.shape, gen, device).to(dtype).cpu()
    return out


def save_weights(state: dict[str, torch.Tensor], out_dir: str) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_config_and_weights(out_dir: str, config: dict[str, Any], config_class: type,
                             random_weights: Callable[[Any, int, str, torch.dtype], dict[str, torch.Tensor]],
                             seed: int, device: str, dtype: torch.dtype, weights: bool = True) -> Any:
    """A checkpoint whose config nests a `text_config`: config.json (read back by transformers,
    which must make a `config_class` of it), random weights (unless `weights` is False) and
    generation_config.json (greedy, the text config's token ids). Returns transformers' config."""
    from transformers import AutoConfig

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "config.json"), config)
    hf_config = AutoConfig.from_pretrained(out_dir)
    if not isinstance(hf_config, config_class):
        raise TypeError(f"config.json loads as {type(hf_config).__name__}, not {config_class.__name__}")
    if weights:
        save_weights(random_weights(hf_config, seed, device, dtype), out_dir)
    text = config["text_config"]
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"],
                "pad_token_id": text["pad_token_id"], "do_sample": False})
    return hf_config


def write_tiny_model(arch: str, out_dir: str, preset: str = "tiny", seed: int = 0,
                     device: str = "cpu", overrides: dict | None = None) -> str:
    """Write a random checkpoint of `arch` (a registered model_type) at `preset` size into
    `out_dir`; returns the path. `overrides` replaces top-level config fields."""
    from epd.models import family_module, tiny_archs

    if arch not in tiny_archs():
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(tiny_archs())}")
    module = family_module(arch)
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {arch}; choose from {', '.join(module.PRESETS)}")
    os.makedirs(out_dir, exist_ok=True)
    module.write_tiny(arch, out_dir, preset, seed, device, overrides)
    return out_dir
