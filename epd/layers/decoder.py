"""A decoder-only language model over a paged KV cache (Llama / Mistral / Qwen2 layers).

Free of serving concerns: it takes a flat batch of token embeddings with their positions and
returns hidden states; attention goes through an `AttentionBackend` that owns the KV pages. The
family gives it the rotary embedding (1-D RoPE, or Qwen2-VL's M-RoPE) and `position_rows`.
Parameter names match the checkpoint's once the family renamed them
(`language_model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`, ...). Numerics follow the
reference implementations (RMSNorm in float32, rotary tables in float32).

On GPU in 16-bit dtypes the loader calls `fuse_projections()` once: q/k/v and gate/up become one
GEMM each, and norms (with the residual add), rotary and silu*mul run as fused kernels
(`epd.kernels.fused_ops`); in steps of a few rows (decode) q/k/v, o_proj and down_proj run as GEMV
kernels (`epd.kernels.decode_gemv`, leaving split-K partial sums: the rotary kernel adds up
q/k/v's with its bias, the next add + norm kernel o_proj's and down_proj's), and gate/up with
silu*mul as one more. Elsewhere the plain torch path runs, unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from epd.config import TextConfig
from epd.engine.attention.base import AttentionBackend
from epd.layers.attention import Attention
from epd.layers.mlp import GatedMLP
from epd.layers.norm import RMSNorm
from epd.layers.parallel import VocabParallelEmbedding, VocabParallelHead, tp_group


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(cfg)
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
        if tp_group().size > 1:   # the projections' partial sums are summed over the group first
            x, h = self.post_attention_layernorm.add_forward(x, attn.o_proj(attended))
            return next_norm.add_forward(x, mlp.down_proj(mlp.activation(h)))
        x, h = self.post_attention_layernorm.add_projection(x, attended, attn.o_proj.weight)
        return next_norm.add_projection(x, mlp.activation(h), mlp.down_proj.weight)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    """Text decoder + LM head. `forward` runs one flat step; `logits` projects selected rows."""

    cross_layers: tuple[int, ...] = ()   # every layer attends over tokens (no cross-attention layers)
    chunked_attention = False            # no layer attends within chunks of positions only
    attention_chunks: tuple[int | None, ...] = ()   # per layer its attention chunk (empty: none chunked)

    def __init__(self, cfg: TextConfig, rotary: nn.Module, position_rows: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.position_rows = position_rows
        self.language_model = TextModel(cfg)
        self.lm_head = VocabParallelHead(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.rotary = rotary

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
        """embeds: [T, H], positions: [position_rows, T] -> final hidden states [T, H].

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
