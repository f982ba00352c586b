"""Vision-tower blocks for the GPU: transformers' block arithmetic in fewer, aligned kernels.

A profile of the Qwen2.5-VL tower on an H200 (one 1280x720 image, 4,784 patches, 32 blocks;
BENCHMARKS.md) put 40 ms of device time into a forward whose matmuls need ~8 ms at the bf16 peak:
- the MLP's intermediate size, 3,420, is not a multiple of 8, so its GEMMs fall back to
  2-byte-aligned Ampere kernels (~21 ms for what aligned Hopper kernels do in about a third);
- the float32 rotary (`rotate_half`, casts, products) and RMSNorms ran as ~30 elementwise
  kernels a block (~14 ms).

`FastVisionBlock` replaces a block with the same computation:
- norm1, then the qkv projection, then one kernel that applies the rotary to q and k and lays
  q, k and v out as varlen attention takes them (`fused_ops.rotary_qkv_split`);
- attention over the block's segments (images, or Qwen2.5-VL's windows) in one varlen call;
- the residual add fused with norm2 for RMSNorm blocks (`fused_ops.add_rms_norm`);
- a gated MLP (Qwen2.5-VL) as one gate+up GEMM and one down GEMM whose intermediate size is
  padded with zero weights to a multiple of 64, and one silu*mul kernel (`PaddedGatedMLP`).
  The padding adds exact zeros, so only the order of the sums can differ from the unpadded GEMM.
Qwen2-VL's LayerNorms and its fc1/QuickGELU/fc2 MLP stay transformers' modules; its rotary and
attention take the same path.

Attention is one varlen flash call per block (`torch.nn.attention.varlen.varlen_attn`) over all
segments; transformers' SDPA path instead splits the packed sequence at every image and window
(84 windows for a 1280x720 image) and syncs with the host each layer.

`install_fast_blocks(module)` swaps them into a built tower; `VisionTower` does so where
`fast_blocks_available` (CUDA, 16-bit, a torch with varlen attention). On a CPU (tests) the fused
ops take their torch paths and attention runs per segment with SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epd.kernels.fused_ops import add_rms_norm, rotary_qkv_split, silu_and_mul

PAD_MULTIPLE = 64


def fast_blocks_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def longest_segment(cu_seqlens: torch.Tensor) -> int:
    """The longest segment (image or window) of a packed sequence, from its boundaries."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _padded(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


class PaddedGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with the intermediate size padded by zero weights."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        inter, hidden = gate.weight.shape
        padded = _padded(inter)
        like = gate.weight
        gate_up = torch.zeros(2 * padded, hidden, dtype=like.dtype, device=like.device)
        gate_up[:inter], gate_up[padded:padded + inter] = gate.weight, up.weight
        self.gate_up_weight = nn.Parameter(gate_up, requires_grad=False)
        self.gate_up_bias = None
        if gate.bias is not None:
            bias = torch.zeros(2 * padded, dtype=gate.bias.dtype, device=like.device)
            bias[:inter], bias[padded:padded + inter] = gate.bias, up.bias
            self.gate_up_bias = nn.Parameter(bias, requires_grad=False)
        down_w = torch.zeros(hidden, padded, dtype=down.weight.dtype, device=like.device)
        down_w[:, :inter] = down.weight
        self.down_weight = nn.Parameter(down_w, requires_grad=False)
        self.down_bias = down.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up_weight, self.gate_up_bias)
        return F.linear(silu_and_mul(gate_up), self.down_weight, self.down_bias)


def _is_rms_norm(norm: nn.Module) -> bool:
    return hasattr(norm, "variance_epsilon") and getattr(norm, "bias", None) is None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
            max_seqlen: int | None) -> torch.Tensor:
    """q, k, v: [S, H, D] -> [S, H, D], attention within each cu_seqlens segment."""
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seqlens.to(torch.int32)
        if max_seqlen is None:
            max_seqlen = longest_segment(cu)
        return varlen_attn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen))
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        seg = [t[lo:hi].transpose(0, 1) for t in (q, k, v)]
        out[lo:hi] = F.scaled_dot_product_attention(*seg).transpose(0, 1)
    return out


class FastVisionBlock(nn.Module):
    """One transformers vision block (Qwen2-VL or Qwen2.5-VL), same parameters, fewer kernels."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.rms = _is_rms_norm(block.norm2)
        self.qkv, self.proj = block.attn.qkv, block.attn.proj
        self.heads = block.attn.num_heads
        act = type(getattr(block.mlp, "act_fn", None)).__name__
        gated = hasattr(block.mlp, "gate_proj") and act in ("SiLU", "SiLUActivation")
        self.mlp = PaddedGatedMLP(block.mlp) if gated else block.mlp

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm(x, None, norm.weight, norm.variance_epsilon)[1] if self.rms else norm(x)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        x = hidden_states
        cos, sin = position_embeddings
        q, k, v = rotary_qkv_split(self.qkv(self._norm(self.norm1, x)), cos, sin, self.heads)
        attn = self.proj(_attend(q, k, v, cu_seqlens, max_seqlen).reshape(x.shape[0], -1))
        if self.rms:
            x, h = add_rms_norm(x, attn, self.norm2.weight, self.norm2.variance_epsilon)
        else:
            x = x + attn
            h = self.norm2(x)
        return x + self.mlp(h)


def install_fast_blocks(module: nn.Module) -> int:
    """Replace a built tower's blocks by `FastVisionBlock`s; returns how many were replaced."""
    blocks = module.blocks
    for i, block in enumerate(blocks):
        blocks[i] = FastVisionBlock(block)
    return len(blocks)
