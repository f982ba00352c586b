"""Llama 4's per-layer kinds (MoE, RoPE / NoPE, chunked attention, QK norm, temperature tuning),
read from config.json without transformers, equal what transformers' `Llama4TextModel` instances
have for the tiny preset, the scout-12l preset, Scout's published text config (with its empty
`no_rope_layers`) and variants that change one rule; the llama3 RoPE frequencies equal
transformers' rotary embedding's."""

from __future__ import annotations

import json
import os

import pytest
import torch

from epd.models.llama4.text_config import LayerSpec, Llama4TextSpec
from epd.models.llama4.tiny import build_config, write_tiny

# Llama-4-Scout-17B-16E's published text_config (its 48 layers, `no_rope_layers` left empty)
SCOUT_TEXT = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
    num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=1, no_rope_layers=[], attention_chunk_size=8192, use_qk_norm=True,
    attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=262144, model_type="llama4_text",
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192})


def _hf_layer_specs(text: dict) -> tuple[tuple[LayerSpec, ...], torch.Tensor]:
    """Each layer's kind as transformers' model built from `text` has it (weights on the meta
    device), and its rotary inverse frequencies."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextModel

    config = Llama4TextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    with torch.device("meta"):
        model = Llama4TextModel(config)
    specs = []
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        specs.append(LayerSpec(
            is_moe=layer.is_moe_layer, uses_rope=bool(attn.use_rope),
            uses_chunked_attention=config.layer_types[i] == "chunked_attention", qk_norm=hasattr(attn, "qk_norm"),
            temperature_tuned=bool(attn.attn_temperature_tuning) and not attn.use_rope))
    rotary = type(model.rotary_emb)(config)    # built off the meta device: real frequencies
    return tuple(specs), rotary.inv_freq


VARIANTS = {
    "tiny": build_config("tiny")["text_config"],
    "scout-12l": build_config("scout-12l")["text_config"],
    "scout": SCOUT_TEXT,
    "moe-every-4th": dict(SCOUT_TEXT, num_hidden_layers=9, interleave_moe_layer_step=4),
    "explicit-moe-layers": dict(SCOUT_TEXT, num_hidden_layers=5, moe_layers=[0, 4]),
    "explicit-nope-layers": dict(SCOUT_TEXT, num_hidden_layers=5, no_rope_layers=[0, 1, 1, 0, 1]),
    "no-chunking": dict(SCOUT_TEXT, num_hidden_layers=5, attention_chunk_size=None),
    "no-qk-norm-no-tuning": dict(SCOUT_TEXT, num_hidden_layers=5, use_qk_norm=False, attn_temperature_tuning=False),
    "no-rope-scaling": dict(SCOUT_TEXT, num_hidden_layers=4, rope_scaling=None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_kinds_equal_transformers(variant: str) -> None:
    text = VARIANTS[variant]
    spec = Llama4TextSpec.from_dict(text)
    expected, inv_freq = _hf_layer_specs(text)
    assert spec.layers == expected
    torch.testing.assert_close(spec.inv_freq(), inv_freq.float(), rtol=1e-6, atol=0)


def test_scout_layers() -> None:
    """Scout: every layer MoE; layers 3, 7, ..., 47 NoPE with full attention and temperature
    tuning; the others chunked by 8192 with QK norm."""
    spec = Llama4TextSpec.from_dict(SCOUT_TEXT)
    nope = [i for i, layer in enumerate(spec.layers) if not layer.uses_rope]
    assert nope == list(range(3, 48, 4))
    assert all(layer.is_moe for layer in spec.layers)
    assert all(layer.uses_chunked_attention == layer.qk_norm == layer.uses_rope != layer.temperature_tuned
               for layer in spec.layers)
    assert (spec.attention_chunk_size, spec.floor_scale, spec.attn_scale, spec.top_k) == (8192, 8192, 0.1, 1)
    tc = spec.text_config()
    assert (tc.hidden_size, tc.intermediate_size, tc.num_heads, tc.num_kv_heads, tc.head_dim) == (
        5120, 16384, 40, 8, 128)


def test_reads_a_written_checkpoint(tmp_path) -> None:
    """The tiny preset's config.json as written: dense and MoE alternate; layers 2 and 5 are NoPE."""
    write_tiny("llama4", str(tmp_path), "tiny", weights=False)
    with open(os.path.join(tmp_path, "config.json")) as f:
        spec = Llama4TextSpec.from_dict(json.load(f)["text_config"])
    assert [layer.is_moe for layer in spec.layers] == [False, True] * 3
    assert [layer.uses_rope for layer in spec.layers] == [True, True, False] * 2
    assert spec.attention_chunk_size == 8 and spec.num_experts == 4
