"""Small-batch decode projections as Triton GEMVs, with the layer's small ops in their prologue
and epilogue.

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

A decode layer of a 3B model has ~10 kernels of a few microseconds each against ~40 us of weight
reads, so each launch (ramp-up, tail) counts. With `FUSED_LAYER` the model's decode steps use
three more forms of the same kernel, which take the layer from ten launches to seven:
- `linear_add(x, w, residual)`: residual + x @ w.T (o_proj, down_proj; the residual add);
- `norm_linear(x, eps, w, bias)`: RMSNorm(x) @ w.T + bias (input norm + q/k/v);
- `norm_gate_up(x, eps, w)`: silu(gate) * up of RMSNorm(x) (post-attention norm + gate/up +
  silu*mul): each program owns the same columns of gate and up.
The norm forms need the norm's gain folded into the weight (`fold_norm_gain`: w * g, the gain
then 1): the dot then runs on x as loaded (any arithmetic on the dot's input keeps Triton from
pipelining the weight stream: 3-4x slower, measured), each row's sum of squares is taken in a
short pass over x after the dot, and 1/rms scales the fp32 sums. They round once where torch
rounds the normalized input and then the product; `tests/gpu/test_decode_gemv.py` bounds the
error against float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epd.models.fused_ops import fused_path, rms_norm_ref, silu_and_mul, tl, triton

MAX_ROWS = 8          # decode batches up to this many rows take the GEMV kernel
FUSED_LAYER = True    # decode layers use the norm/residual forms (gpu_bench times it off, too)
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
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, y, m, n, k, y, x, 0.0, BLOCK_M=_ROW_TILE,
                                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


def fused_layer_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return FUSED_LAYER and gemv_path(x, weight)


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight.T, with torch's roundings (the product, then the sum)."""
    if not gemv_path(x, weight):
        return residual + F.linear(x, weight)
    y = torch.empty_like(residual)
    _launch(x, weight, y, weight.shape[0], dict(res_ptr=residual.contiguous(), HAS_RESIDUAL=True))
    return y


def fold_norm_gain(norm_weight: torch.Tensor, weight: torch.Tensor) -> None:
    """In place: weight[:, k] *= gain[k] (rounded like torch's product), gain := 1. The pair then
    computes what it did, and the norm forms below apply (they take no gain)."""
    weight.mul_(norm_weight[None, :].to(weight.dtype))
    norm_weight.fill_(1)


def norm_linear(x: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                config: dict | None = None) -> torch.Tensor:
    """rms_norm(x) (unit gain) @ weight.T + bias."""
    if not gemv_path(x, weight):
        return F.linear(rms_norm_ref(x, torch.ones_like(x[0]), eps), weight, bias)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight, y, weight.shape[0], dict(eps=eps, NORM=True, bias_ptr=bias, HAS_BIAS=bias is not None),
            config)
    return y


def norm_gate_up(x: torch.Tensor, eps: float, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """weight: [gate; up] (2 I x K) -> silu(gate) * up of rms_norm(x) (unit gain): [M, I]."""
    if not gemv_path(x, weight):
        return silu_and_mul(F.linear(rms_norm_ref(x, torch.ones_like(x[0]), eps), weight))
    inter = weight.shape[0] // 2
    y = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    _launch(x, weight, y, inter, dict(eps=eps, NORM=True, GATED=True), config)
    return y


def _launch(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, n: int, extra: dict,
            config: dict | None = None) -> None:
    m, k = x.shape
    block_n, block_k, warps, stages = (block_config(n, k, extra.get("GATED", False)) if config is None else
                                       (config["block_n"], config["block_k"], config["warps"], config["stages"]))
    args = dict(res_ptr=y, bias_ptr=x, eps=0.0) | extra
    if config is not None and "norm_in_loop" in config:
        args["NORM_IN_LOOP"] = config["norm_in_loop"]
    if args["bias_ptr"] is None:
        args["bias_ptr"] = x
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, y, m, n, k, BLOCK_M=_ROW_TILE, BLOCK_N=block_n,
                                             BLOCK_K=block_k, num_warps=warps, num_stages=stages, **args)


def block_config(n: int, k: int, gated: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for n output columns over k: the best of the sweep
    in bench/gpu_gemv.py on an H200 (2026-11-29): 16 columns a program below ~3k outputs (3b: 128
    programs), 32 above (7b: 112). Gated programs read 16 columns each of gate and up (32 do not
    fit four stages in shared memory)."""
    return (32 if n >= 3072 and not gated else 16), 512, 4, 4


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, res_ptr, bias_ptr, eps, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr = False,
                     GATED: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
                     HAS_RESIDUAL: tl.constexpr = False, NORM_IN_LOOP: tl.constexpr = False):
        """y[:, cols] = epilogue(x @ w[cols].T); NORM: scaled by each row's 1/rms. GATED: also the
        same columns of the second half of w (up), and y = silu(gate) * up."""
        rows = tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w_cols = w_ptr + cols[None, :].to(tl.int64) * K           # [1, BLOCK_N]: columns of w.T
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            h = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            if NORM and NORM_IN_LOOP:
                sum_sq += tl.sum(h.to(tl.float32) * h.to(tl.float32), axis=1)
            w = tl.load(w_cols + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(h, w, acc)
            if GATED:
                w_up = tl.load(w_cols + N * K + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc_up = tl.dot(h, w_up, acc_up)
        if NORM and not NORM_IN_LOOP:   # x again (L2-resident, a few KB), after the weight stream
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                h = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :],
                            other=0.0).to(tl.float32)
                sum_sq += tl.sum(h * h, axis=1)
        _gemv_epilogue(acc, acc_up, sum_sq, y_ptr, res_ptr, bias_ptr, rows, rmask, cols, cmask, N, K, eps,
                       NORM, GATED, HAS_BIAS, HAS_RESIDUAL)

    @triton.jit
    def _gemv_epilogue(acc, acc_up, sum_sq, y_ptr, res_ptr, bias_ptr, rows, rmask, cols, cmask, N, K, eps,
                       NORM: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr):
        dtype = y_ptr.dtype.element_ty
        if NORM:
            inv_rms = tl.rsqrt(sum_sq / K + eps)[:, None]
            acc = acc * inv_rms
            acc_up = acc_up * inv_rms
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        out = acc.to(dtype)
        mask = rmask[:, None] & cmask[None, :]
        if GATED:   # torch: silu of the rounded gate, rounded; times the rounded up, rounded
            gate = out.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            out = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
            out = (res.to(tl.float32) + out.to(tl.float32)).to(dtype)
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], out, mask=mask)
