"""The gated MLP, down_proj(silu(gate_proj(x)) * up_proj(x)); gate/up fused into one GEMM on GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epd.config import TextConfig
from epd.kernels.decode_gemv import silu_mul_project
from epd.layers.attention import fuse_linears


class GatedMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused path: x [T, H] -> down_proj(silu(gate) * up) [T, H]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path's silu(gate) * up [T, I], what down_proj takes."""
        return silu_mul_project(x, self.gate_up_proj.weight)
