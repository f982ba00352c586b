"""Small-batch decode projections (o_proj, down_proj) as one Triton GEMV each.

At batch 1 a decode step reads every weight once, so a projection's time is its weight bytes
over the memory bandwidth plus what the kernel adds on top. For the matrices whose output is the
hidden size (o_proj, down_proj: N = 2048 or 3584 outputs) cuBLAS picks a kernel with few output
tiles and splits K, which costs a second reduce kernel; here each program owns 16 or 32 output
columns over the whole K, with rows padded to one 16-row tensor-core tile for `tl.dot` (free in
a memory-bound kernel) and Triton's pipeliner keeping several weight tiles in flight.
`bench/gpu_gemv.py` measures both on the model shapes (BENCHMARKS.md, section 1).

The kernel only reorders the fp32 sums of a dot product (as two GEMM kernels do); the output is
rounded once, like cuBLAS's. `gemv_path(x, w)` says when it applies: Triton importable, CUDA
16-bit tensors, 1..MAX_ROWS rows; otherwise `linear` is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epd.models.fused_ops import fused_path, tl, triton

MAX_ROWS = 8          # decode batches up to this many rows take the GEMV kernel
_ROW_TILE = 16        # rows padded to one tensor-core tile


def gemv_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (fused_path(x) and 0 < x.shape[0] <= MAX_ROWS and weight.dtype == x.dtype
            and weight.is_contiguous() and x.is_contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N]. `config` (block_n, block_k, warps, stages) overrides
    `block_config` (the bench's sweep)."""
    if not gemv_path(x, weight):
        return F.linear(x, weight)
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = (block_config(n, k) if config is None else
                                       (config["block_n"], config["block_k"], config["warps"], config["stages"]))
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, y, m, n, k, BLOCK_M=_ROW_TILE, BLOCK_N=block_n,
                                             BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


def block_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n x k] weight: the best of the sweep in
    bench/gpu_gemv.py on an H200 (2026-11-29): 16 columns a program below ~3k outputs (3b: 128
    programs), 32 above (7b: 112)."""
    return (32 if n >= 3072 else 16), 512, 4, 4


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        rows = tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w_cols = w_ptr + cols[None, :].to(tl.int64) * K           # [1, BLOCK_N]: columns of w.T
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            h = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_cols + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(h, w, acc)
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
