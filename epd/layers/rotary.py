"""Rotary position embedding over 1-D positions (the Llama / Mistral / Qwen2 text models).

The inverse frequencies come from transformers' own functions for the checkpoint's RoPE type
(default, linear, llama3, yarn: static scalings), so cos / sin equal the reference's; types that
change with the sequence length (dynamic NTK, longrope) are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from epd.kernels.fused_ops import apply_rotary_ref

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(text_hf_config: Any) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] float32, attention scaling of cos / sin)."""
    rope = dict(text_hf_config.rope_parameters or {})
    kind = rope.get("rope_type", "default")
    if kind not in STATIC_ROPE_TYPES:
        raise ValueError(f"RoPE type {kind!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
    tc = text_hf_config
    if kind == "default":
        dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        theta = float(rope.get("rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](tc, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """cos / sin tables for positions [1, T] (row 0 is read)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scaling = scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [rows, T] -> cos, sin: [T, head_dim]."""
        freqs = positions[0].float()[:, None] * self.inv_freq[None, :]   # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D], cos/sin: [T, D]."""
    return apply_rotary_ref(x, cos, sin)
