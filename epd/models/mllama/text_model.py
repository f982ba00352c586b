"""Llama-3.2-Vision's text model: Llama 3 self-attention layers with gated cross-attention layers
(`cross_attention_layers`) between them, over the paged KV cache.

A cross-attention layer reads the request's image rows: their keys and values are computed once
per request from the vision encoder's output (`cross_kv`: k_proj + k_norm, v_proj) and kept in
that layer's KV tensor at the request's cross pages; the step's `CrossStep`
(`epd.engine.attention.cross`) attends each token's q (q_proj + q_norm, no rotary) over the rows it
sees and says which tokens run the layer's MLP (`mlp_scale`: 0 for a token that sees no image, as
transformers' full_text_row_masked_out_mask). A step whose requests have no image rows skips the
cross-attention layers, as transformers does for text-only input. The input embedding has 8 rows
past the vocabulary (`<|image|>` among them); the LM head covers the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from epd.config import TextConfig
from epd.engine.attention.base import AttentionBackend
from epd.layers.decoder import DecoderLayer
from epd.layers.mlp import GatedMLP
from epd.layers.norm import RMSNorm
from epd.layers.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    local_size,
)


class CrossAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        heads, kv, d = "the attention heads", "the KV heads", cfg.head_dim
        self.num_heads, self.num_kv_heads = local_size(cfg.num_heads, heads), local_size(cfg.num_kv_heads, kv)
        self.head_dim = d
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * d, bias=False, what=heads)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * d, bias=False, what=kv)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * d, bias=False, what=kv)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, bias=False, what=heads)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [R, H] (the vision encoder's output) -> k, v [R, Hkv, D]."""
        r = states.shape[0]
        k = self.k_norm(self.k_proj(states).view(r, self.num_kv_heads, self.head_dim))
        return k, self.v_proj(states).view(r, self.num_kv_heads, self.head_dim)


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, h: torch.Tensor, cross, kv_cache: torch.Tensor,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, h: input_layernorm(x) -> (x after the layer, next_norm of it)."""
        attn, t = self.cross_attn, x.shape[0]
        q = attn.q_norm(attn.q_proj(h).view(t, attn.num_heads, attn.head_dim))
        attended = attn.o_proj(cross.attend(q, kv_cache).reshape(t, -1))
        x = x + self.cross_attn_attn_gate.tanh() * attended
        mlp = self.mlp(self.post_attention_layernorm(x)) * cross.mlp_scale.to(x.dtype)
        return next_norm.add_forward(x, self.cross_attn_mlp_gate.tanh() * mlp)


class MllamaTextModel(nn.Module):
    def __init__(self, cfg: TextConfig, cross_layers: tuple[int, ...]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.prompt_vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([CrossAttentionLayer(cfg) if i in cross_layers else DecoderLayer(cfg)
                                     for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MllamaLM(nn.Module):
    """Text model + LM head, the engine's language-model interface (`DecoderLM`'s), with `cross`."""

    chunked_attention = False
    attention_chunks: tuple[int | None, ...] = ()

    def __init__(self, cfg: TextConfig, rotary: nn.Module, cross_layers: tuple[int, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        self.position_rows = 1
        self.cross_layers = tuple(sorted(cross_layers))
        self.language_model = MllamaTextModel(cfg, self.cross_layers)
        self.lm_head = VocabParallelHead(cfg.hidden_size, cfg.vocab_size)
        self.rotary = rotary

    def fuse_projections(self) -> None:
        for i, layer in enumerate(self.language_model.layers):
            if i not in self.cross_layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def cross_kv(self, states: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(layer index, k, v [R, Hkv, D]) of every cross-attention layer for image rows `states`."""
        layers = self.language_model.layers
        return [(i, *layers[i].cross_attn.keys_values(states)) for i in self.cross_layers]

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend,
                kv_layers: list[torch.Tensor], after_layer=None, cross=None) -> torch.Tensor:
        """embeds [T, H], positions [1, T] -> final hidden states [T, H]; `cross` (a planned
        `CrossStep`) None: no token of the step has image rows, the cross layers are skipped."""
        cos, sin = self.rotary(positions, embeds.dtype)
        layers = self.language_model.layers
        run = [i for i in range(len(layers)) if cross is not None or i not in self.cross_layers]
        norms = [layers[i].input_layernorm for i in run[1:]] + [self.language_model.norm]
        x, h = layers[run[0]].input_layernorm.add_forward(embeds, None)
        next_norms = dict(zip(run, norms, strict=True))
        for i, layer in enumerate(layers):
            if i in next_norms and i in self.cross_layers:
                x, h = layer(x, h, cross, kv_layers[i], next_norms[i])
            elif i in next_norms:
                x, h = layer(x, h, cos, sin, backend, kv_layers[i], next_norms[i])
            if after_layer is not None:   # a skipped layer has nothing to wait for
                after_layer(i)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(hidden)
        return out if out.dtype == torch.float64 else out.float()
