"""The pieces of the Llama-3.2-Vision tower: tile and position embeddings, encoder layers.

Parameter names are the checkpoint's (`embedding`, `gate`, `self_attn.q_proj`, `mlp.fc1`, ...), so
weights load by name. Shapes: B images, T tiles an image (max_num_tiles, padding tiles included),
P positions a tile (class token + patches), D the tower's width, L = T * P8 tokens an image once
each tile is padded to P8 (a multiple of 8) positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TileEmbedding(nn.Module):
    """A learned vector per (aspect ratio, tile), scaled by tanh(gate) and added to every position of the tile."""

    def __init__(self, num_ratios: int, max_tiles: int, hidden: int) -> None:
        super().__init__()
        self.max_tiles, self.hidden = max_tiles, hidden
        self.embedding = nn.Embedding(num_ratios + 1, max_tiles * hidden)   # row 0: padding images
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, N, D], ratio_ids [B] -> x + tanh(gate) * per-tile vector [B, T, 1, D]."""
        per_tile = self.embedding(ratio_ids).view(-1, self.max_tiles, 1, self.hidden)
        return x + per_tile * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """Each position's embedding, mixed by a gate g with a per-(aspect ratio, tile, position) one:
    x + (1 - tanh g) * shared + tanh g * tiled."""

    def __init__(self, num_ratios: int, max_tiles: int, positions: int, hidden: int) -> None:
        super().__init__()
        self.max_tiles, self.positions, self.hidden = max_tiles, positions, hidden
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(positions, hidden))
        self.tile_embedding = nn.Embedding(num_ratios + 1, max_tiles * positions * hidden)

    def forward(self, x: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, P, D] -> same shape."""
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        tiled = self.tile_embedding(ratio_ids).view(-1, self.max_tiles, self.positions, self.hidden)
        return x + gate * tiled


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], allowed: bool [B, 1, L, L] (query, key) -> [B, L, D]."""
        batch, length, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:   # [B, heads, L, head_dim]
            return proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj),
                                             attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.fc1 = nn.Linear(hidden, intermediate)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm attention + MLP; in a gated layer (the global encoder's) each branch is scaled by
    tanh of its learned gate before the residual add."""

    def __init__(self, hidden: int, num_heads: int, intermediate: int, eps: float, act: str, gated: bool) -> None:
        super().__init__()
        self.self_attn = Attention(hidden, num_heads)
        self.mlp = MLP(hidden, intermediate, act)
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), allowed)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * mlp if self.gated else mlp)


class Encoder(nn.Module):
    def __init__(self, num_layers: int, **layer_args) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_args) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor,
                keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, L, D] -> (output [B, L, D], the outputs of the layers numbered in `keep`, in its order)."""
        kept: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, allowed)
            if i in keep:
                kept[i] = x
        return x, [kept[i] for i in keep]


def tile_attention_mask(tile_mask: torch.Tensor, positions: int, padded: int) -> torch.Tensor:
    """allowed: bool [B, 1, T * padded, T * padded] from tile_mask [B, T] (1: a real tile).

    A token is padding when its tile is or it is one of a tile's `padded - positions` filler
    positions. Only (padding query, padding key) pairs are masked: real queries attend to every
    key, padding ones to real keys only (the masking of transformers' and Meta's reference code)."""
    batch, tiles = tile_mask.shape
    filler = torch.arange(padded, device=tile_mask.device) >= positions           # [padded]
    is_pad = (tile_mask[:, :, None] == 0) | filler[None, None]                     # [B, T, padded]
    is_pad = is_pad.reshape(batch, tiles * padded)
    return ~(is_pad[:, :, None] & is_pad[:, None, :])[:, None]
