"""Llama 4's vision encoder and projector: what turns a request's tiles into `<|patch|>` embeddings.

Per tile (`image_size` px, e.g. 336; the processor's global view is one more tile):
  patches  = linear(unfold(pixels, patch_size))           # no bias; [P, vision hidden]
  x        = layernorm_pre([patches; class embedding] + positional_embedding_vlm)
  layers   : x += attention(LN(x)) ; x += fc2(gelu(fc1(LN(x))))   (biases everywhere; full attention
             over the tile's P + 1 positions, q and k rotated by a 2-D RoPE: the first half of each
             head's pairs by the patch's column + 1, the second half by its row + 1, the class token
             not at all; the rotation in float32, as complex products)
  x        = layernorm_post(x) without the class token      # [P, vision hidden]
  adapter  : pixel shuffle (ratio r: each 1/r x 1/r block of patches becomes one token of channels * 1/r^2),
             then gelu(fc2(gelu(fc1(.))))                    # [P * r^2, vision_output_dim]
  projector: linear_1 -> [P * r^2, text hidden]             # one row per `<|patch|>` token
Parameter names below `vision.` are the checkpoint's (`vision_model.*`, `multi_modal_projector.*`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def rope_table(cfg: Any) -> torch.Tensor:
    """complex64 [P + 1, head_dim / 2]: each position's rotation of each head-dim pair (class token last: 1)."""
    side = cfg.image_size // cfg.patch_size
    half = cfg.hidden_size // cfg.num_attention_heads // 2          # pairs per head
    theta = float((cfg.rope_parameters or {}).get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)   # [half / 2]
    index = torch.arange(side * side)
    cols, rows = (index % side + 1).float(), (index // side + 1).float()
    angles = torch.cat([cols[:, None] * inv_freq[None], rows[:, None] * inv_freq[None]], dim=1)   # [P, half]
    angles = torch.cat([angles, torch.zeros(1, half)])                 # the class token: no rotation
    return torch.polar(torch.ones_like(angles), angles)


def rotate_pairs(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [T, P + 1, heads, D]: pair (2i, 2i + 1) of each head times table[:, i], in float32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * table[None, :, None, :]).flatten(3).type_as(x)


class VisionAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        width = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, width // cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.o_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        t, n, _ = x.shape
        shape = (t, n, self.heads, self.head_dim)
        q = rotate_pairs(self.q_proj(x).view(shape), table)
        k = rotate_pairs(self.k_proj(x).view(shape), table)
        v = self.v_proj(x).view(shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(t, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.self_attn, self.mlp = VisionAttention(cfg), VisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), table)
        return x + self.mlp(self.post_attention_layernorm(x))


class Layers(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.patch = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size ** 2, cfg.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[T, C, H, W] -> [T, P, hidden]: each patch's (channel, row, column) values, patches row by row."""
        return self.linear(F.unfold(pixels, self.patch, stride=self.patch).transpose(1, 2))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[T, P, C] (P a square) -> [T, P * ratio^2, C / ratio^2]: blocks of 1/ratio x 1/ratio patches merged."""
    t, p, c = x.shape
    side = int(p ** 0.5)
    x = x.view(t, side, int(side * ratio), int(c / ratio))                 # fold columns into channels
    x = x.permute(0, 2, 1, 3).reshape(t, int(side * ratio), int(side * ratio), int(c / ratio ** 2))   # then rows
    return x.permute(0, 2, 1, 3).reshape(t, -1, int(c / ratio ** 2))


class Adapter(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(cfg.intermediate_size, cfg.projector_input_dim, bias=False)
        self.mlp.fc2 = nn.Linear(cfg.projector_output_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(x, self.ratio)
        return F.gelu(self.mlp.fc2(F.gelu(self.mlp.fc1(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(positions, cfg.hidden_size))
        self.layernorm_pre, self.layernorm_post = nn.LayerNorm(cfg.hidden_size), nn.LayerNorm(cfg.hidden_size)
        self.model = Layers(cfg)
        self.vision_adapter = Adapter(cfg)
        self.rope = rope_table(cfg)   # complex: kept out of the module's dtype casts (made again on a device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """tiles [T, C, H, W] -> [T, tokens a tile, vision_output_dim]."""
        x = self.patch_embedding(pixels)
        x = torch.cat([x, self.class_embedding.expand(x.shape[0], 1, -1)], dim=1)
        x = self.layernorm_pre(x + self.positional_embedding_vlm.to(x.dtype))
        table = self.rope.to(x.device)
        for layer in self.model.layers:
            x = layer(x, table)
        return self.vision_adapter(self.layernorm_post(x)[:, :-1])


class Llama4Vision(nn.Module):
    """Tower + projector, named as in the checkpoint."""

    def __init__(self, hf: Any) -> None:
        super().__init__()
        self.vision_model = VisionTower(hf.vision_config)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(hf.vision_config.vision_output_dim,
                                                        hf.text_config.hidden_size, bias=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """[T, C, H, W] -> [T * tokens a tile, text hidden], tile after tile."""
        return self.multi_modal_projector.linear_1(self.vision_model(tiles)).flatten(0, 1)
