"""Self-attention over the paged KV cache: q/k/v projections (with or without bias), rotary, o_proj.

On GPU in 16-bit dtypes `fuse()` makes q/k/v one GEMM; the rotary and the K/V cache write then run
as one fused kernel, and in steps of a few rows (decode) the projections as split-K GEMV kernels
whose partial sums the rotary kernel adds up (with the bias). Elsewhere the plain torch path runs.
"""

from __future__ import annotations

import torch
from torch import nn

from epd.config import TextConfig
from epd.engine.attention.base import AttentionBackend
from epd.kernels.decode_gemv import gemv_path, project
from epd.kernels.fused_ops import rotary_qk, rotary_qk_store_kv
from epd.layers.parallel import ColumnParallelLinear, RowParallelLinear, local_size
from epd.layers.rotary import apply_rotary


def fuse_linears(parts: list[nn.Linear]) -> nn.Linear:
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
        # under tensor parallelism: this process's heads
        self.num_heads, self.num_kv_heads = local_size(cfg.num_heads, "the attention heads"), \
            local_size(cfg.num_kv_heads, "the KV heads")
        self.head_dim = d = cfg.head_dim
        bias, heads, kv = cfg.qkv_bias, "the attention heads", "the KV heads"
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * d, bias=bias, what=heads)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias, what=kv)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias, what=kv)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, bias=False, what=heads)
        self.qkv_proj: nn.Linear | None = None  # set by fuse(); q/k/v_proj are then dropped

    def fuse(self) -> None:
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
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
