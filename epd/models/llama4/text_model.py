"""Llama 4's text model over the paged KV cache (the engine's language-model interface).

Per layer (`LayerSpec`): RoPE layers rotate q and k (Llama 4 rotates interleaved pairs; the loader
reorders q_proj / k_proj rows even-first, `deinterleave_rope_rows`, so the engine's half rotation
gives the same attention), then take the weightless QK norm, and attend within their chunk of
`attention_chunk_size` positions (the backend's `chunk`); NoPE layers attend over everything
before them with q scaled by the attention temperature of its position. The feed-forward is the
MoE (top-k routed experts scaled by their sigmoid scores, plus the shared expert) on MoE layers,
the dense gated MLP (`intermediate_size_mlp`) elsewhere. `attention_math` is the whole-prompt
reference this equals.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from epd.engine.attention.base import AttentionBackend
from epd.layers.mlp import GatedMLP
from epd.layers.norm import RMSNorm
from epd.layers.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    local_size,
)
from epd.layers.rotary import apply_rotary
from epd.models.llama4.attention_math import temperature_scales, weightless_rms_norm
from epd.models.llama4.moe import Llama4MoE
from epd.models.llama4.text_config import LayerSpec, Llama4TextSpec


class Llama4Attention(nn.Module):
    def __init__(self, spec: Llama4TextSpec, kind: LayerSpec) -> None:
        super().__init__()
        self.kind, self.spec = kind, spec
        hq, hk, d, bias = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.head_dim, \
            spec.attention_bias
        heads, kv = "the attention heads", "the KV heads"
        self.num_heads, self.num_kv_heads = local_size(spec.num_heads, heads), local_size(spec.num_kv_heads, kv)
        self.q_proj = ColumnParallelLinear(spec.hidden_size, hq, bias=bias, what=heads)
        self.k_proj = ColumnParallelLinear(spec.hidden_size, hk, bias=bias, what=kv)
        self.v_proj = ColumnParallelLinear(spec.hidden_size, hk, bias=bias, what=kv)
        self.o_proj = RowParallelLinear(hq, spec.hidden_size, bias=bias, what=heads)
        self.head_dim = d

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, temperature: torch.Tensor,
                backend: AttentionBackend, kv_cache: torch.Tensor) -> torch.Tensor:
        t, kind, spec = x.shape[0], self.kind, self.spec
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if kind.uses_rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kind.qk_norm:
            q, k = weightless_rms_norm(q, spec.rms_norm_eps), weightless_rms_norm(k, spec.rms_norm_eps)
        if kind.temperature_tuned:
            q = (q * temperature[:, None, None]).to(q.dtype)
        chunked = {"chunk": spec.attention_chunk_size} if kind.uses_chunked_attention else {}
        return self.o_proj(backend.attend(q, k, v, kv_cache, **chunked).reshape(t, -1))


class Llama4Layer(nn.Module):
    def __init__(self, spec: Llama4TextSpec, kind: LayerSpec) -> None:
        super().__init__()
        self.self_attn = Llama4Attention(spec, kind)
        dense = spec.text_config()
        if kind.is_moe:
            self.feed_forward = Llama4MoE(dataclasses.replace(dense, intermediate_size=spec.intermediate_size),
                                          spec.num_experts, spec.top_k)
        else:
            self.feed_forward = GatedMLP(dense)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, temperature: torch.Tensor,
                backend: AttentionBackend, kv_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, temperature, backend, kv_cache)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class Llama4TextModel(nn.Module):
    def __init__(self, spec: Llama4TextSpec) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([Llama4Layer(spec, kind) for kind in spec.layers])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class Llama4LM(nn.Module):
    position_rows = 1
    cross_layers: tuple[int, ...] = ()

    def __init__(self, spec: Llama4TextSpec, rotary: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.cfg = spec.text_config()
        self.language_model = Llama4TextModel(spec)
        self.lm_head = VocabParallelHead(spec.hidden_size, spec.vocab_size)
        self.rotary = rotary
        self.attention_chunks = tuple(spec.attention_chunk_size if kind.uses_chunked_attention else None
                                      for kind in spec.layers)
        self.chunked_attention = any(self.attention_chunks)   # backends must offer it

    def fuse_projections(self) -> None:
        """(The fused GPU path is not written for this family yet: the plain one runs.)"""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend,
                kv_layers: list[torch.Tensor], after_layer=None) -> torch.Tensor:
        cos, sin = self.rotary(positions, embeds.dtype)
        temperature = temperature_scales(positions[0], self.spec.floor_scale, self.spec.attn_scale)
        x = embeds
        for i, layer in enumerate(self.language_model.layers):
            x = layer(x, cos, sin, temperature, backend, kv_layers[i])
            if after_layer is not None:
                after_layer(i)
        return self.language_model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(hidden)
        return out if out.dtype == torch.float64 else out.float()
