"""Random Qwen2-VL / Qwen2.5-VL checkpoints: `tiny` for tests, `3b` / `7b` with the real dims.

Weights are named as on the Hub (`visual.*`, `model.layers.*`, `lm_head.*`); the tokenizer has
Qwen's special tokens (with the real ids at full size) and a ChatML template.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from epd.models.qwen2_vl.tokenizer import build_tokenizer, save_tokenizer
from epd.models.tiny_model import random_state_dict, save_weights, write_json

PRESETS = ("tiny", "3b", "7b")

# Text dims: tiny, then Qwen2-VL-2B / Qwen2.5-VL-3B ("3b") and Qwen2(.5)-VL-7B ("7b").
_TEXT = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1e6),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6),
}
_TEXT_QWEN2_VL_3B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6)

_VISION_QWEN2 = {
    "tiny": dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2),
    "full": dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16),
}
_VISION_QWEN2_5 = {
    "tiny": dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1, 3],
                 window_size=56),
    "full": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                 fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
}
# Tiny images stay small so CPU tests are fast: at most 64 merged tokens per image.
_PIXELS = {"tiny": (4 * 28 * 28, 64 * 28 * 28), "full": (4 * 28 * 28, 16384 * 28 * 28)}


def text_dims(arch: str, preset: str) -> dict:
    if arch == "qwen2_vl" and preset == "3b":
        return dict(_TEXT_QWEN2_VL_3B)
    return dict(_TEXT[preset])


def build_config(arch: str, preset: str, base_vocab: int) -> dict[str, Any]:
    """The config.json content, in the Hub's layout for these models."""
    text = text_dims(arch, preset)
    kind = "tiny" if preset == "tiny" else "full"
    if arch == "qwen2_vl":
        vision = dict(_VISION_QWEN2[kind], hidden_size=text["hidden_size"], hidden_act="quick_gelu")
    else:
        vision = dict(_VISION_QWEN2_5[kind], out_hidden_size=text["hidden_size"], hidden_act="silu",
                      tokens_per_second=2)
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    ids = {name: base_vocab + i for i, name in enumerate(
        ["bos", "im_start", "eos", "", "", "", "", "", "", "vision_start", "vision_end", "vision_pad",
         "image", "video"])}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration" if arch == "qwen2_vl"
                          else "Qwen2_5_VLForConditionalGeneration"],
        "model_type": arch,
        **text,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": preset == "3b" and arch == "qwen2_5_vl",
        "torch_dtype": "float32" if preset == "tiny" else "bfloat16",
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "image_token_id": ids["image"],
        "video_token_id": ids["video"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "vision_config": vision,
    }


def hub_name(name: str) -> str:
    """transformers 5 module names -> the names Hub checkpoints use."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def _save_processor(out_dir: str, preset: str) -> None:
    min_px, max_px = _PIXELS["tiny" if preset == "tiny" else "full"]
    write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": min_px, "max_pixels": max_px,
        "size": {"shortest_edge": min_px, "longest_edge": max_px},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    })


def write_tiny(arch: str, out_dir: str, preset: str, seed: int, device: str, overrides: dict | None) -> None:
    from transformers import AutoConfig

    base_vocab = 1000 if preset == "tiny" else 151643
    config = build_config(arch, preset, base_vocab)
    config.update(overrides or {})
    write_json(os.path.join(out_dir, "config.json"), config)
    hf_config = AutoConfig.from_pretrained(out_dir)
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    save_weights(random_state_dict(hf_config, seed, device, dtype, hub_name), out_dir)
    write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [config["eos_token_id"], config["bos_token_id"]],
        "pad_token_id": config["bos_token_id"],
        "do_sample": False,
    })
    save_tokenizer(build_tokenizer(base_vocab, seed), out_dir, config["max_position_embeddings"])
    _save_processor(out_dir, preset)
