"""Llama 4's text model in plain torch (`reference_text_forward`) against transformers'
`Llama4ForConditionalGeneration` on a random tiny checkpoint, 27-token prompts cut in chunks of 8:
every layer's attention block gives transformers' output for transformers' input (chunked RoPE
layers with QK norm, full NoPE layers with temperature tuning), and the logits are equal in
float32. Each rule matters: dropping chunking, temperature tuning or QK norm, or rotating in halves
instead of interleaved pairs, moves the logits off transformers'."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from epd.models.llama4 import attention_math
from epd.models.llama4.attention_math import attention_layer, reference_text_forward
from epd.models.llama4.text_config import Llama4TextSpec

PROMPT_LENGTH = 27


@pytest.fixture(scope="module")
def checkpoint(tiny_models) -> str:
    return tiny_models["llama4"]   # the session's tiny checkpoint (epd tiny-model llama4)


@pytest.fixture(scope="module")
def spec(checkpoint) -> Llama4TextSpec:
    with open(os.path.join(checkpoint, "config.json")) as f:
        return Llama4TextSpec.from_dict(json.load(f)["text_config"])


@pytest.fixture(scope="module")
def weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(checkpoint, "model.safetensors"))


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model.language_model(input_ids=ids[None]).logits[0]


def test_spec_covers_every_layer_kind(spec) -> None:
    kinds = {(layer.is_moe, layer.uses_rope) for layer in spec.layers}
    assert kinds == {(False, True), (True, True), (False, False), (True, False)}
    assert spec.attention_chunk_size < PROMPT_LENGTH // 2 and spec.floor_scale < PROMPT_LENGTH


def test_each_attention_layer_equals_transformers(hf_model, spec, weights) -> None:
    caught: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def catcher(layer: int):
        def catch(_module, _args, kwargs, output):
            caught[layer] = (kwargs["hidden_states"][0], output[0][0])
        return catch

    layers = hf_model.language_model.model.layers
    handles = [layer.self_attn.register_forward_hook(catcher(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _hf_logits(hf_model, _prompt(0))
    finally:
        for handle in handles:
            handle.remove()
    positions = torch.arange(PROMPT_LENGTH)
    for layer, (h, expected) in caught.items():
        with torch.no_grad():
            got = attention_layer(weights, spec, layer, h, positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, i=layer: f"layer {i}: {m}")


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_equal_transformers(hf_model, spec, weights, seed: int) -> None:
    ids = _prompt(seed)
    expected = _hf_logits(hf_model, ids)
    with torch.no_grad():
        got = reference_text_forward(weights, spec, ids)
    assert got.shape == (PROMPT_LENGTH, spec.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _half_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The other RoPE convention: (x[i], x[i + D/2]) rotated together."""
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).to(x.dtype)


def _without(spec: Llama4TextSpec, **change: bool) -> Llama4TextSpec:
    return dataclasses.replace(spec, layers=tuple(dataclasses.replace(layer, **change) for layer in spec.layers))


@pytest.mark.parametrize("dropped", ["chunking", "temperature", "qk_norm", "interleaved_pairs"])
def test_each_rule_matters(hf_model, spec, weights, monkeypatch, dropped: str) -> None:
    if dropped == "chunking":
        spec = _without(spec, uses_chunked_attention=False)
    elif dropped == "temperature":
        spec = _without(spec, temperature_tuned=False)
    elif dropped == "qk_norm":
        spec = _without(spec, qk_norm=False)
    else:
        monkeypatch.setattr(attention_math, "apply_interleaved_rope", _half_rotation)
    ids = _prompt(0)
    expected = _hf_logits(hf_model, ids)
    with torch.no_grad():
        got = reference_text_forward(weights, spec, ids)
    assert (got - expected).abs().max() > 1e-2


def test_engine_rotary_on_deinterleaved_weights(hf_model, spec, weights, monkeypatch) -> None:
    """With q_proj / k_proj rows reordered by `deinterleave_rope_rows`, the engine's half-rotation
    rotary (cos / sin tables of the frequencies repeated twice) gives transformers' logits."""
    from epd.layers.rotary import apply_rotary

    def engine_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1))

    monkeypatch.setattr(attention_math, "apply_interleaved_rope", engine_rotary)
    reordered = dict(weights)
    for name in weights:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            reordered[name] = attention_math.deinterleave_rope_rows(weights[name], spec.head_dim)
    ids = _prompt(1)
    with torch.no_grad():
        got = reference_text_forward(reordered, spec, ids)
    torch.testing.assert_close(got, _hf_logits(hf_model, ids), atol=1e-4, rtol=1e-4)
