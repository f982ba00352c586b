"""The Qwen2-VL / Qwen2.5-VL language model over a paged KV cache.

Free of serving concerns: it takes a flat batch of token embeddings with their M-RoPE positions
and returns hidden states; attention goes through an `AttentionBackend` that owns the KV pages.
Parameter names match the checkpoint (`language_model.layers.N.self_attn.q_proj.weight`, ...).
Numerics follow the reference implementation (RMSNorm in float32, rotary tables in float32).

On GPU in 16-bit dtypes the loader calls `fuse_projections()` once: q/k/v and gate/up become one
GEMM each, and norms (with the residual add), rotary and silu*mul run as fused kernels
(`fused_ops`); in steps of a few rows (decode) q/k/v, o_proj and down_proj run as GEMV kernels
(`decode_gemv`, leaving split-K partial sums: the rotary kernel adds up q/k/v's with its bias, the
next add + norm kernel o_proj's and down_proj's), and gate/up with silu*mul as one more.
Elsewhere the plain torch path runs, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epd.config import TextConfig
from epd.engine.attention.base import AttentionBackend
from epd.kernels.decode_gemv import gemv_path, project, silu_mul_project
from epd.kernels.fused_ops import (
    add_rms_norm,
    apply_rotary_ref,
    rms_norm_ref,
    rotary_qk,
    rotary_qk_store_kv,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)) in one kernel on GPU; delta None = no add."""
        return add_rms_norm(x, delta, self.weight, self.eps)

    def add_projection(self, x: torch.Tensor, h: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`add_forward(x, h @ weight.T)`; on the decode GEMV path the add + norm kernel adds up the
        projection's split-K partial sums itself."""
        return add_rms_norm(x, project(h, weight), self.weight, self.eps)


class MRotaryEmbedding(nn.Module):
    """M-RoPE: frequency bands take their position from the temporal, height or width row."""

    def __init__(self, head_dim: int, theta: float, section: tuple[int, ...]) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        band = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("band", band, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [3, T] -> cos, sin: [T, head_dim]."""
        pos = positions.float()[self.band]              # [D/2, T]
        freqs = (pos * self.inv_freq[:, None]).t()      # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D], cos/sin: [T, D]."""
    return apply_rotary_ref(x, cos, sin)


def _fuse_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the parts' outputs concatenated (one GEMM instead of several)."""
    w = torch.cat([p.weight.data for p in parts])
    bias = parts[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    fused.weight.data = w
    if bias:
        fused.bias.data = torch.cat([p.bias.data for p in parts])
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse(); q/k/v_proj are then dropped

    def fuse(self) -> None:
        self.qkv_proj = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend, kv_cache: torch.Tensor) -> torch.Tensor:
        """The unfused path (CPU, float32/float64): x [T, H] -> the attention block's output [T, H]."""
        t, hq, hk, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(t, hq, d)
        k = self.k_proj(x).view(t, hk, d)
        v = self.v_proj(x).view(t, hk, d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(backend.attend(q, k, v, kv_cache).reshape(t, -1))

    def attend_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   backend: AttentionBackend, kv_cache: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> attention output [T, hq * D] (before o_proj): the fused q/k/v projection, rotary
        on q and k, the step's K/V into the cache."""
        t, hq, hk, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        proj = self.qkv_proj
        slots = backend.kv_write_slots()
        if slots is not None:                            # k and v go straight to the cache
            if gemv_path(x, proj.weight) and kv_cache.dtype == x.dtype:
                # decode GEMV: the rotary kernel adds up its split-K partial sums and the bias
                q = rotary_qk_store_kv(project(x, proj.weight), cos, sin, hq, hk, kv_cache, slots, bias=proj.bias)
            else:
                q = rotary_qk_store_kv(proj(x), cos, sin, hq, hk, kv_cache, slots)
            return backend.attend(q, None, None, kv_cache).reshape(t, -1)
        qkv = proj(x)
        q = rotary_qk(qkv, cos, sin, hq, hk)             # k rotated in place
        k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
        v = qkv[:, (hq + hk) * d:].view(t, hk, d)
        return backend.attend(q, k, v, kv_cache).reshape(t, -1)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up_proj = _fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused path: x [T, H] -> down_proj(silu(gate) * up) [T, H]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path's silu(gate) * up [T, I], what down_proj takes."""
        return silu_mul_project(x, self.gate_up_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend, kv_cache: torch.Tensor,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, h: this layer's input norm of it; returns the residual stream after
        the layer and `next_norm` of it (the next layer's input norm, or the final one). Each residual
        add goes with the norm after it, so the GPU does add + norm in one kernel, or (decode GEMV
        path) the projection before it too."""
        attn, mlp = self.self_attn, self.mlp
        if attn.qkv_proj is None:
            x, h = self.post_attention_layernorm.add_forward(x, attn(h, cos, sin, backend, kv_cache))
            return next_norm.add_forward(x, mlp(h))
        attended = attn.attend_qkv(h, cos, sin, backend, kv_cache)
        x, h = self.post_attention_layernorm.add_projection(x, attended, attn.o_proj.weight)
        return next_norm.add_projection(x, mlp.activation(h), mlp.down_proj.weight)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2VLLanguageModel(nn.Module):
    """Text decoder + LM head. `forward` runs one flat step; `logits` projects selected rows."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.language_model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.rotary = MRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up weights (fewer, larger GEMMs); done once after loading,
        on GPU. The unfused modules are dropped, so weights stay in memory once."""
        for layer in self.language_model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend,
                kv_layers: list[torch.Tensor], after_layer=None) -> torch.Tensor:
        """embeds: [T, H], positions: [3, T] -> final hidden states [T, H].

        `after_layer(i)` is called once layer i's K/V are in the cache (the prefill node uses it
        to stream KV layer group by layer group while later layers still compute).
        """
        cos, sin = self.rotary(positions, embeds.dtype)
        layers = self.language_model.layers
        norms = [layer.input_layernorm for layer in layers[1:]] + [self.language_model.norm]
        x, h = layers[0].input_layernorm.add_forward(embeds, None)
        for i, (layer, next_norm) in enumerate(zip(layers, norms, strict=True)):
            x, h = layer(x, h, cos, sin, backend, kv_layers[i], next_norm)
            if after_layer is not None:
                after_layer(i)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Sampling runs in float32 at least (float64 stays float64)."""
        out = self.lm_head(hidden)
        return out if out.dtype == torch.float64 else out.float()
