"""Random Llama 4 checkpoints: the tiny preset loads as transformers' `Llama4Config` and
`Llama4ForConditionalGeneration` runs an image prompt on it (2x1 tiles + the global view, the
`<|patch|>` tokens replaced by projected patches); the tokenizer has Llama 4's special tokens at Llama
4's offsets, the chat template its header format; the weights are named as on the Hub; the
scout-12l preset writes Scout's dims (12 layers) without weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

from epd.models.llama4.tiny import token_ids, write_tiny

SPECIAL = ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|image_start|>", "<|image_end|>",
           "<|patch|>", "<|image|>", "<|tile_x_separator|>", "<|tile_y_separator|>")
PATCHES_PER_TILE = 4    # (56 / 14)^2 patches, pixel-shuffled by 0.5 in each direction


@pytest.fixture(scope="module")
def checkpoint(tiny_models) -> str:
    return tiny_models["llama4"]   # the session's tiny checkpoint (epd tiny-model llama4)


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_tokenizer_has_llama4_special_tokens(checkpoint) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = token_ids("tiny")
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL] == [ids[t] for t in SPECIAL]
    assert ids["<|begin_of_text|>"] == 1000 and ids["<|patch|>"] == 1092 and ids["<|image|>"] == 1090
    config = _config(checkpoint)
    assert (config["image_token_index"], config["boi_token_index"], config["eoi_token_index"]) == (
        ids["<|patch|>"], ids["<|image_start|>"], ids["<|image_end|>"])
    assert len(tok) == config["text_config"]["vocab_size"] == 1000 + 2048
    encoded = tok("<|header_start|>user<|header_end|><|patch|><|patch|>", add_special_tokens=False).input_ids
    assert encoded[0] == ids["<|header_start|>"] and encoded[-2:] == [ids["<|patch|>"]] * 2
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>hi<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n")


def test_weights_are_named_as_on_the_hub(checkpoint) -> None:
    from safetensors import safe_open

    with safe_open(os.path.join(checkpoint, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        gate_up = f.get_tensor("language_model.model.layers.1.feed_forward.experts.gate_up_proj")
        down = f.get_tensor("language_model.model.layers.1.feed_forward.experts.down_proj")
    assert {"language_model.lm_head.weight", "language_model.model.layers.0.feed_forward.gate_proj.weight",
            "language_model.model.layers.1.feed_forward.router.weight",
            "language_model.model.layers.1.feed_forward.shared_expert.down_proj.weight",
            "multi_modal_projector.linear_1.weight", "vision_model.patch_embedding.linear.weight"} <= names
    assert gate_up.shape == (4, 64, 2 * 96) and down.shape == (4, 96, 64)
    assert 0.5 < gate_up.std().item() * 64**0.5 < 2    # drawn for fan-in H, not H * 2I


def test_transformers_runs_an_image_prompt(checkpoint) -> None:
    from transformers import AutoTokenizer, Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tiles = "<|patch|>" * PATCHES_PER_TILE
    image = f"<|image_start|>{tiles}<|tile_x_separator|>{tiles}<|tile_y_separator|><|image|>{tiles}<|image_end|>"
    ids = tok(f"<|begin_of_text|>{image}what is it", add_special_tokens=False, return_tensors="pt").input_ids
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_image = model(input_ids=ids, pixel_values=pixels).logits
        other_image = model(input_ids=ids, pixel_values=pixels.flip(-1)).logits
    assert with_image.shape == (1, ids.shape[1], 3048) and torch.isfinite(with_image).all()
    assert not torch.allclose(with_image[0, -1], other_image[0, -1], atol=1e-3)


def test_scout_12l_config_without_weights(tmp_path) -> None:
    from transformers import AutoConfig

    write_tiny("llama4", str(tmp_path), "scout-12l", weights=False)
    assert not any(name.endswith(".safetensors") for name in os.listdir(tmp_path))
    text = AutoConfig.from_pretrained(str(tmp_path)).text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (5120, 40, 8, 128)
    assert (text.intermediate_size, text.intermediate_size_mlp, text.num_local_experts) == (8192, 16384, 16)
    assert (text.num_experts_per_tok, text.vocab_size, text.num_hidden_layers) == (1, 202048, 12)
    assert (text.attention_chunk_size, text.floor_scale, text.attn_scale) == (8192, 8192, 0.1)
    assert text.use_qk_norm and text.attn_temperature_tuning and text.moe_layers == list(range(12))
    assert text.no_rope_layers == [1, 1, 1, 0] * 3
    assert text.rope_parameters["rope_type"] == "llama3" and text.rope_parameters["rope_theta"] == 500000.0
    vision = _config(str(tmp_path))["vision_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["image_size"], vision["vision_output_dim"]) == (
        1408, 34, 336, 4096)
    assert _config(str(tmp_path))["image_token_index"] == 200092


def test_scout_config_is_the_whole_model_and_equals_the_published_text_config(tmp_path) -> None:
    """`scout`: Scout's 48 layers (every fourth without RoPE), all else as scout-12l; transformers
    builds it (on the meta device) with about 109B parameters."""
    from transformers import AutoConfig, Llama4ForConditionalGeneration

    write_tiny("llama4", str(tmp_path), "scout", weights=False)
    config = AutoConfig.from_pretrained(str(tmp_path))
    text = config.text_config
    assert text.num_hidden_layers == 48 and text.moe_layers == list(range(48))
    assert text.no_rope_layers == [1, 1, 1, 0] * 12 and text.hidden_size == 5120
    with torch.device("meta"):
        params = sum(p.numel() for p in Llama4ForConditionalGeneration(config).parameters())
    assert 107e9 < params < 110e9, params


def test_unknown_preset_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="scout-12l"):
        write_tiny("llama4", str(tmp_path), "maverick")
