"""Random LLaVA checkpoints: `tiny` presets for tests, `7b` with the real dimensions for benchmarks.

- `llava`: CLIP + Llama (LLaVA-1.5; `7b` = LLaVA-1.5-7B), Vicuna template.
- `llava_next`: CLIP + Mistral (`7b` = LLaVA-NeXT-Mistral-7B, Mistral template); `tiny-vicuna`
  (Llama, Vicuna template) and `tiny-llama3` (Llama 3 tokens and template, as Llama3-LLaVA-NeXT).
- `llava_onevision`: SigLIP + Qwen2 (`7b` = LLaVA-OneVision-Qwen2-7B), ChatML template.
Weights are named as llava-hf checkpoints on the Hub name them; the tokenizer has the backbone's
special tokens plus `<image>` and the checkpoint's own chat template.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from tokenizers import processors

from epd.models.llava import chat_templates
from epd.models.tiny_model import random_state_dict, save_weights, write_json
from epd.models.tiny_tokenizer import build_bpe

PRESETS = ("tiny", "tiny-vicuna", "tiny-llama3", "7b")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)
_TEXT_7B = {
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
                    sliding_window=None),
    "qwen2": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6),
}
_VISION = {
    ("clip", "tiny"): dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
    ("clip", "7b"): dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                         projection_dim=768),
    ("siglip", "tiny"): dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14,
                             vision_use_head=False),
    ("siglip", "7b"): dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                           vision_use_head=False),
}
# (text model, tokens, template) of each arch / preset
_BACKBONE = {
    ("llava", "tiny"): ("llama", "llama2", "LLAVA_1_5_TEMPLATE"),
    ("llava", "7b"): ("llama", "llama2", "LLAVA_1_5_TEMPLATE"),
    ("llava_next", "tiny"): ("mistral", "llama2", "LLAVA_NEXT_MISTRAL_TEMPLATE"),
    ("llava_next", "tiny-vicuna"): ("llama", "llama2", "LLAVA_1_5_TEMPLATE"),
    ("llava_next", "tiny-llama3"): ("llama", "llama3", "LLAMA3_LLAVA_NEXT_TEMPLATE"),
    ("llava_next", "7b"): ("mistral", "llama2", "LLAVA_NEXT_MISTRAL_TEMPLATE"),
    ("llava_onevision", "tiny"): ("qwen2", "qwen2", "LLAVA_ONEVISION_TEMPLATE"),
    ("llava_onevision", "7b"): ("qwen2", "qwen2", "LLAVA_ONEVISION_TEMPLATE"),
}
# special tokens: (leading ids 0.., after the base vocabulary, bos, eos, pad, base vocab at 7b, vocab at 7b)
_TOKENS = {
    "llama2": (("<unk>", "<s>", "</s>"), ("<image>", "<pad>"), "<s>", "</s>", "<pad>", 32000, 32064),
    "llama3": ((), ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<image>"), "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", 128000, 128320),
    "qwen2": ((), ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"), None, "<|im_end|>",
              "<|endoftext|>", 151643, 152128),
}


def text_dims(arch: str, preset: str) -> dict:
    model = _BACKBONE[(arch, preset)][0]
    return dict(_TEXT_7B[model]) if preset == "7b" else dict(_TINY_TEXT, rope_theta=10000.0)


def _pinpoints(arch: str, crop: int) -> list[list[int]]:
    if arch == "llava_onevision":
        return [[crop * r, crop * c] for r in range(1, 7) for c in range(1, 7)]
    return [[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop], [3 * crop, crop], [crop, 3 * crop]]


def build_config(arch: str, preset: str, ids: dict[str, int], vocab: int) -> dict[str, Any]:
    model, _, _ = _BACKBONE[(arch, preset)]
    size = "7b" if preset == "7b" else "tiny"
    vision = dict(_VISION[("siglip" if arch == "llava_onevision" else "clip", size)])
    dtype = "bfloat16" if size == "7b" else "float32"
    text = dict(text_dims(arch, preset), model_type=model, vocab_size=vocab, hidden_act="silu",
                tie_word_embeddings=False, bos_token_id=ids.get("bos"), eos_token_id=ids["eos"], torch_dtype=dtype)
    config = {
        "architectures": [{"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                           "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[arch]],
        "model_type": arch, "text_config": text, "vision_config": vision, "image_token_index": ids["image"],
        "projector_hidden_act": "gelu", "tie_word_embeddings": False, "torch_dtype": dtype,
        "vision_feature_select_strategy": "full" if arch == "llava_onevision" else "default",
        "vision_feature_layer": -1 if arch == "llava_onevision" else -2,
    }
    if arch != "llava":
        config["image_grid_pinpoints"] = _pinpoints(arch, vision["image_size"])
    if arch == "llava_onevision":
        config.update(vision_aspect_ratio="anyres_max_9", video_token_index=ids["video"])
    return config


def hub_name(name: str) -> str:
    """transformers 5 module names -> the names llava-hf checkpoints use."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + name[len("model.vision_tower."):]
    return name[len("model."):] if name.startswith("model.") else name


def _processor_config(arch: str, crop: int) -> dict[str, Any]:
    common = {"do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
              "rescale_factor": 1 / 255}
    if arch == "llava_onevision":
        return dict(common, image_processor_type="LlavaOnevisionImageProcessor", image_mean=[0.5] * 3,
                    image_std=[0.5] * 3, size={"height": crop, "width": crop}, do_pad=True,
                    image_grid_pinpoints=_pinpoints(arch, crop))
    clip = dict(common, image_mean=CLIP_MEAN, image_std=CLIP_STD, size={"shortest_edge": crop},
                crop_size={"height": crop, "width": crop}, do_center_crop=True)
    if arch == "llava":
        return dict(clip, image_processor_type="CLIPImageProcessor")
    return dict(clip, image_processor_type="LlavaNextImageProcessor", image_grid_pinpoints=_pinpoints(arch, crop),
                do_pad=True)


def write_tiny(arch: str, out_dir: str, preset: str, seed: int, device: str, overrides: dict | None) -> None:
    from transformers import AutoConfig, PreTrainedTokenizerFast

    if (arch, preset) not in _BACKBONE:
        raise ValueError(f"no preset {preset!r} for {arch}")
    _, kind, template = _BACKBONE[(arch, preset)]
    leading, special, bos, eos, pad, base_7b, vocab_7b = _TOKENS[kind]
    base = base_7b if preset == "7b" else 1000
    tok = build_bpe(base, seed, special, leading)
    if bos:   # Llama's tokenizers start every text with BOS (so transformers' processor adds it to a chat)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    ids = {"bos": tok.token_to_id(bos) if bos else None, "eos": tok.token_to_id(eos),
           "image": tok.token_to_id("<image>"), "video": tok.token_to_id("<video>")}
    config = build_config(arch, preset, ids, vocab_7b if preset == "7b" else base + 24)
    config.update(overrides or {})
    write_json(os.path.join(out_dir, "config.json"), config)
    hf_config = AutoConfig.from_pretrained(out_dir)
    dtype = torch.bfloat16 if preset == "7b" else torch.float32
    save_weights(random_state_dict(hf_config, seed, device, dtype, hub_name), out_dir)
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": tok.token_to_id(pad)})
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                            unk_token="<unk>" if "<unk>" in leading else None,
                            model_max_length=config["text_config"]["max_position_embeddings"],
                            chat_template=getattr(chat_templates, template),
                            extra_special_tokens={"image_token": "<image>"}).save_pretrained(out_dir)
    write_json(os.path.join(out_dir, "preprocessor_config.json"),
               _processor_config(arch, config["vision_config"]["image_size"]))
