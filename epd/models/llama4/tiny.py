"""Random Llama 4 checkpoints: `tiny` for tests, `scout-12l` with Llama-4-Scout-17B-16E's dims
but 12 of its 48 layers (one GPU), `scout` with all 48 (about 109B parameters: tensor parallelism).

config.json is written in the Hub's layout (`text_config` with `rope_theta` + llama3 `rope_scaling`,
`vision_config`, `image_token_index` = `<|patch|>`) and checked by loading it as transformers'
`Llama4Config`; the weights are those of transformers' `Llama4ForConditionalGeneration` for it,
random, under the Hub's names (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_model.*`, `multi_modal_projector.*`, the same in transformers 5). The tiny preset keeps the
real structure at small sizes: 6 text layers alternating dense / MoE (4 experts, top-1), a NoPE
layer every third (2: dense, 5: MoE), RoPE layers chunked by 8 positions with QK norm, temperature
tuning from position 3 on (floor_scale 4), llama3 RoPE scaling whose frequencies fall in all three
bands; a 2-layer ViT on 56-px tiles of 14-px patches (4 tokens a tile after the pixel shuffle).
Writing scout-12l's weights (~25B parameters) is meant for a GPU (`device`); its config alone is cheap.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from epd.models.llama4.tokenizer import OFFSETS, build_tokenizer, save_tokenizer
from epd.models.tiny_model import random_state_dict, write_config_and_weights, write_json

PRESETS = ("tiny", "scout-12l", "scout")
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]

_BASE_VOCAB = {"tiny": 1000, "scout-12l": 200000, "scout": 200000}
_TEXT = {
    "tiny": dict(hidden_size=64, intermediate_size=96, intermediate_size_mlp=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                 num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[], no_rope_layer_interval=3,
                 attention_chunk_size=8, floor_scale=4, attn_scale=0.1, max_position_embeddings=8192,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
    "scout-12l": dict(hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=12,
                      num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=16,
                      num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1, 1, 0] * 3,
                      attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1, max_position_embeddings=262144,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
_VISION = {
    "tiny": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                 projector_input_dim=64, projector_output_dim=64, vision_output_dim=64),
    "scout-12l": dict(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16,
                      image_size=336, projector_input_dim=4096, projector_output_dim=4096, vision_output_dim=4096),
}
_TEXT["scout"] = dict(_TEXT["scout-12l"], num_hidden_layers=48, no_rope_layers=[1, 1, 1, 0] * 12)
_VISION["scout"] = _VISION["scout-12l"]
_MAX_TILES = 16


def text_dims(arch: str, preset: str) -> dict:
    return dict(_TEXT[preset], vocab_size=_BASE_VOCAB[preset] + 2048, rms_norm_eps=1e-5, rope_theta=500000.0)


def token_ids(preset: str) -> dict[str, int]:
    """Ids of the named special tokens (`<|patch|>`, `<|eot|>`, ...) of `preset`'s tokenizer."""
    return {name: _BASE_VOCAB[preset] + offset for name, offset in OFFSETS.items()}


def build_config(preset: str) -> dict[str, Any]:
    """The config.json content, in the Hub's layout for these models."""
    ids = token_ids(preset)
    dtype = "float32" if preset == "tiny" else "bfloat16"
    text = dict(text_dims("llama4", preset), model_type="llama4_text", hidden_act="silu", attention_bias=False,
                attention_dropout=0.0, attn_temperature_tuning=True, use_qk_norm=True, initializer_range=0.02,
                router_aux_loss_coef=0.001, router_jitter_noise=0.0, tie_word_embeddings=False, use_cache=True,
                torch_dtype=dtype, bos_token_id=ids["<|begin_of_text|>"], pad_token_id=ids["<|finetune_right_pad|>"],
                eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]])
    vision = dict(_VISION[preset], model_type="llama4_vision_model", hidden_act="gelu", num_channels=3, patch_size=14,
                  norm_eps=1e-5, pixel_shuffle_ratio=0.5, projector_dropout=0.0, attention_dropout=0.0,
                  multi_modal_projector_bias=False, rope_theta=10000, vision_feature_layer=-1,
                  vision_feature_select_strategy="default", initializer_range=0.02)
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "boi_token_index": ids["<|image_start|>"], "eoi_token_index": ids["<|image_end|>"],
            "image_token_index": ids["<|patch|>"], "text_config": text, "vision_config": vision,
            "torch_dtype": dtype, "tie_word_embeddings": False}


def _processor_config(tile: int) -> dict[str, Any]:
    return {"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": MEAN, "image_std": STD, "max_patches": _MAX_TILES, "resample": 2,
            "rescale_factor": 1 / 255, "resize_to_max_canvas": False, "size": {"height": tile, "width": tile}}


def random_weights(hf_config: Any, seed: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights of every tensor of transformers' model. The batched expert weights are drawn
    per expert, for fan-in H (gate_up_proj [E, H, 2I]) and I (down_proj [E, I, H]); the generic draw
    would take the whole [H, 2I] slab as fan-in and make the experts vanish."""
    state = random_state_dict(hf_config, seed, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    for name in state:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            shape = state[name].shape
            draw = torch.randn(shape, generator=gen, device=device) / shape[1] ** 0.5
            state[name] = draw.to(dtype).cpu()
    return state


def write_tiny(arch: str, out_dir: str, preset: str = "tiny", seed: int = 0, device: str = "cpu",
               overrides: dict | None = None, weights: bool = True) -> None:
    """A checkpoint directory of `preset`; weights=False writes everything but the weights."""
    from transformers import Llama4Config

    if preset not in PRESETS:
        raise ValueError(f"no preset {preset!r} for llama4; choose from {', '.join(PRESETS)}")
    config = build_config(preset)
    config.update(overrides or {})
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    write_config_and_weights(out_dir, config, Llama4Config, random_weights, seed, device, dtype, weights)
    text = config["text_config"]
    save_tokenizer(build_tokenizer(_BASE_VOCAB[preset], seed), out_dir, text["max_position_embeddings"])
    tile = config["vision_config"]["image_size"]
    write_json(os.path.join(out_dir, "preprocessor_config.json"), _processor_config(tile))
