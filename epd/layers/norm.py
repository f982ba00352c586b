"""RMSNorm, with the residual add (and, on the decode GEMV path, the projection before it) fused."""

from __future__ import annotations

import torch
from torch import nn

from epd.kernels.decode_gemv import project
from epd.kernels.fused_ops import add_rms_norm, rms_norm_ref


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
