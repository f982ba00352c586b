"""The Llama 4 text model's config, read from config.json's `text_config`, with each layer's kind.

Llama 4 layers differ in two independent ways:
- feed-forward: MoE (routed experts + shared expert) on the layers of `moe_layers`, by default every
  `interleave_moe_layer_step`-th layer counting from 1 (step 1: all; step 2: layers 1, 3, 5, ...);
  the others a dense gated MLP of width `intermediate_size_mlp`.
- attention: `no_rope_layers[i]` is 1 where layer i uses RoPE (an empty or missing list means a NoPE
  layer every `no_rope_layer_interval`-th layer counting from 1: 3, 7, 11, ... at the default 4).
  RoPE layers attend within their chunk of `attention_chunk_size` positions (chunk = position //
  size; none set: full causal) and, with `use_qk_norm`, RMS-normalize q and k (no weight) after the
  rotary. NoPE layers attend causally over the whole prompt and, with `attn_temperature_tuning`,
  scale q by 1 + attn_scale * log(1 + floor((position + 1) / floor_scale)). An explicit
  `layer_types` list ("chunked_attention" / "full_attention") decides chunking instead.

`Llama4TextSpec.from_dict` reproduces these defaults without transformers; the engine's own
`TextConfig` (dense MLP width as `intermediate_size`) comes from `text_config()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from epd.config import TextConfig


@dataclass(frozen=True)
class LayerSpec:
    """What kind of layer one decoder layer is."""
    is_moe: bool                   # routed experts + shared expert (else the dense MLP)
    uses_rope: bool                # rotary on q/k (else NoPE)
    uses_chunked_attention: bool   # attends only within its chunk of attention_chunk_size positions
    qk_norm: bool                  # weightless RMS norm of q and k after the rotary
    temperature_tuned: bool        # q scaled by a per-position factor (NoPE layers)


@dataclass(frozen=True)
class Llama3RopeScaling:
    """RoPE type `llama3`: long wavelengths divided by `factor`, short ones kept, a smooth band between."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class Llama4TextSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int          # one routed expert's (and the shared expert's) width
    intermediate_size_mlp: int      # the dense layers' MLP width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    num_experts: int
    top_k: int
    attention_chunk_size: int | None
    floor_scale: float
    attn_scale: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    layers: tuple[LayerSpec, ...]

    @classmethod
    def from_dict(cls, text: dict[str, Any]) -> Llama4TextSpec:
        """From config.json's `text_config` (transformers' defaults for missing fields)."""
        num_layers = int(text.get("num_hidden_layers", 48))
        hidden, heads = int(text.get("hidden_size", 5120)), int(text.get("num_attention_heads", 40))
        chunk = text.get("attention_chunk_size", 8192)
        theta, scaling = _rope(text)
        return cls(
            vocab_size=int(text.get("vocab_size", 202048)), hidden_size=hidden,
            intermediate_size=int(text.get("intermediate_size", 8192)),
            intermediate_size_mlp=int(text.get("intermediate_size_mlp", 16384)),
            num_layers=num_layers, num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            attention_bias=bool(text.get("attention_bias", False)),
            num_experts=int(text.get("num_local_experts", 16)), top_k=int(text.get("num_experts_per_tok", 1)),
            attention_chunk_size=None if chunk is None else int(chunk),
            floor_scale=float(text.get("floor_scale", 8192)), attn_scale=float(text.get("attn_scale", 0.1)),
            rope_theta=theta, rope_scaling=scaling, layers=layer_specs(text, num_layers))

    def text_config(self) -> TextConfig:
        """The engine's view of the text model (`intermediate_size`: the dense layers' MLP)."""
        return TextConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size_mlp,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            qkv_bias=self.attention_bias)

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim / 2], float32."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)


def layer_specs(text: dict[str, Any], num_layers: int) -> tuple[LayerSpec, ...]:
    """Each layer's kind, by transformers' rules (see the module docstring)."""
    step = int(text.get("interleave_moe_layer_step", 1))
    moe_layers = text.get("moe_layers")
    if moe_layers is None:
        moe_layers = range(step - 1, num_layers, step)
    moe = set(moe_layers)
    rope_flags = text.get("no_rope_layers") or []
    if not rope_flags:
        interval = int(text.get("no_rope_layer_interval", 4))
        rope_flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    chunked = text.get("attention_chunk_size", 8192) is not None
    types = text.get("layer_types") or [
        "chunked_attention" if rope and chunked else "full_attention" for rope in rope_flags]
    qk_norm = bool(text.get("use_qk_norm", True))
    tuning = bool(text.get("attn_temperature_tuning", True))
    out = []
    for i in range(num_layers):
        rope = bool(rope_flags[i])
        out.append(LayerSpec(is_moe=i in moe, uses_rope=rope, uses_chunked_attention=types[i] == "chunked_attention",
                             qk_norm=qk_norm and rope, temperature_tuned=tuning and not rope))
    return tuple(out)


def _rope(text: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) from `rope_parameters` (transformers 5) or the Hub's
    `rope_theta` + `rope_scaling`."""
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", text.get("rope_theta", 500000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"Llama 4 with RoPE type {kind!r}: only 'default' and 'llama3' are supported")
    return theta, Llama3RopeScaling(
        factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i / head_dim), i < head_dim / 2, with llama3 scaling applied:
    wavelengths above original / low_freq_factor slowed by `factor`, below original /
    high_freq_factor kept, in between blended linearly in original / wavelength."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    original = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    slowed = inv_freq / scaling.factor
    long_wave = wavelength > original / scaling.low_freq_factor
    short_wave = wavelength < original / scaling.high_freq_factor
    if scaling.high_freq_factor == scaling.low_freq_factor:   # no band between: nothing to blend
        return torch.where(long_wave, slowed, inv_freq)
    blend = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    between = (1 - blend) * slowed + blend * inv_freq
    return torch.where(long_wave, slowed, torch.where(short_wave, inv_freq, between))
