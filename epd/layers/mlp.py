"""The gated MLP, down_proj(silu(gate_proj(x)) * up_proj(x)); gate/up fused into one GEMM on GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epd.config import TextConfig
from epd.kernels.decode_gemv import silu_mul_project
from epd.layers.attention import fuse_linears
from epd.layers.parallel import ColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    def __init__(self, cfg: TextConfig, reduce: bool = True) -> None:
        """Under tensor parallelism each process holds a slice of the width; `reduce=False` leaves
        the output this process's partial sum (the caller sums it with others, then reduces)."""
        super().__init__()
        width, what = cfg.intermediate_size, "the MLP width"
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, width, bias=False, what=what)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, width, bias=False, what=what)
        self.down_proj = RowParallelLinear(width, cfg.hidden_size, bias=False, reduce=reduce, what=what)
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
