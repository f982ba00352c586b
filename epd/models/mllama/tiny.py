"""Random Llama-3.2-Vision (`mllama`) checkpoints: `tiny` for tests, `11b` with the real dims.

config.json is written in the Hub's layout (`text_config` with `rope_theta` + llama3
`rope_scaling`, `vision_config`, `image_token_index`) and checked by loading it as transformers'
`MllamaConfig`; the weights are those of transformers' `MllamaForConditionalGeneration` for it,
random, under the Hub's names (`language_model.model.*`, `vision_model.*`, ...). The tiny preset
keeps the real structure at small sizes: 56-px tiles of 14-px patches (17 positions a tile with
the class token, 7 of padding to 24), up to 4 tiles in the 8 arrangements transformers derives,
4 local + 2 global (gated) vision layers with intermediate layers [0, 2], a 5-layer text model with
cross-attention layers [1, 3]. Writing the 11b weights (~10.7B parameters) is meant for a GPU
(`device`); its config alone is cheap.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from epd.models.mllama.image_processor import supported_aspect_ratios
from epd.models.mllama.names import hub_name
from epd.models.mllama.tokenizer import build_tokenizer, save_tokenizer
from epd.models.tiny_model import random_state_dict, write_config_and_weights, write_json

PRESETS = ("tiny", "11b")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# (base vocabulary, special tokens before `<|image|>`) of each preset; text vocab_size is their sum
_VOCAB = {"tiny": (1000, 16), "11b": (128000, 256)}
# llama3 rope scaling; the tiny preset's shorter original context puts its few frequencies in all three bands
_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_ORIGINAL_CONTEXT = {"tiny": 1024, "11b": 8192}
_TEXT = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                 num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=8192),
    "11b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                max_position_embeddings=131072),
}
_VISION = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=2,
                 image_size=56, intermediate_layers_indices=[0, 2]),
    "11b": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                attention_heads=16, image_size=560, intermediate_layers_indices=[3, 7, 15, 23, 30]),
}
_MAX_TILES = 4
# Tensors whose rows are per-(aspect ratio, tile) embeddings: drawn at O(1) scale (the generic draw
# scales them by their row width, which would make the tile embeddings vanish in tests)
_TILE_EMBEDDINGS = ("pre_tile_positional_embedding.embedding.weight",
                    "post_tile_positional_embedding.embedding.weight",
                    "gated_positional_embedding.tile_embedding.weight")


def text_dims(arch: str, preset: str) -> dict:
    base, special = _VOCAB[preset]
    return dict(_TEXT[preset], vocab_size=base + special, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling=dict(_ROPE_SCALING, original_max_position_embeddings=_ORIGINAL_CONTEXT[preset]))


def build_config(preset: str) -> dict[str, Any]:
    """The config.json content, in the Hub's layout for these models."""
    base, special = _VOCAB[preset]
    ids = {"bos": base, "end_of_text": base + 1, "pad": base + 4, "eom": base + 8, "eot": base + 9}
    dtype = "float32" if preset == "tiny" else "bfloat16"
    text = dict(text_dims("mllama", preset), model_type="mllama_text_model", hidden_act="silu", dropout=0,
                initializer_range=0.02, tie_word_embeddings=False, use_cache=True, torch_dtype=dtype,
                bos_token_id=ids["bos"], pad_token_id=ids["pad"],
                eos_token_id=[ids["end_of_text"], ids["eom"], ids["eot"]])
    vision_dims = _VISION[preset]
    vision = dict(vision_dims, model_type="mllama_vision_model", hidden_act="gelu", num_channels=3, patch_size=14,
                  norm_eps=1e-5, max_num_tiles=_MAX_TILES, initializer_range=0.02,
                  supported_aspect_ratios=[list(r) for r in supported_aspect_ratios(_MAX_TILES)],
                  vision_output_dim=vision_dims["hidden_size"] * (1 + len(vision_dims["intermediate_layers_indices"])))
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": base + special, "text_config": text, "vision_config": vision, "torch_dtype": dtype,
            "tie_word_embeddings": False}


def _processor_config(tile: int) -> dict[str, Any]:
    return {"image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
            "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "max_image_tiles": _MAX_TILES, "resample": 2,
            "rescale_factor": 1 / 255, "size": {"height": tile, "width": tile}}


def random_weights(hf_config: Any, seed: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights of every tensor of transformers' model, under the Hub's names."""
    state = random_state_dict(hf_config, seed, device, dtype, hub_name)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    for name in state:
        if name.endswith(_TILE_EMBEDDINGS):
            state[name] = (0.5 * torch.randn(state[name].shape, generator=gen, device=device)).to(dtype).cpu()
    return state


def write_tiny(arch: str, out_dir: str, preset: str = "tiny", seed: int = 0, device: str = "cpu",
               overrides: dict | None = None, weights: bool = True) -> None:
    """A checkpoint directory of `preset`; weights=False writes everything but the weights."""
    from transformers import MllamaConfig

    if preset not in PRESETS:
        raise ValueError(f"no preset {preset!r} for mllama; choose from {', '.join(PRESETS)}")
    config = build_config(preset)
    config.update(overrides or {})
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    write_config_and_weights(out_dir, config, MllamaConfig, random_weights, seed, device, dtype, weights)
    text = config["text_config"]
    base, special = _VOCAB[preset]
    save_tokenizer(build_tokenizer(base, special, seed), out_dir, text["max_position_embeddings"])
    tile = config["vision_config"]["image_size"]
    write_json(os.path.join(out_dir, "preprocessor_config.json"), _processor_config(tile))
