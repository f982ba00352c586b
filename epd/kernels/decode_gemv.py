"""Small-batch decode projections (q/k/v, o_proj, gate/up, down_proj) as one Triton GEMV each.

At batch 1 a decode step reads every weight once, so a projection's time is its weight bytes
over the memory bandwidth plus what the kernel adds on top. For the matrices whose output is the
hidden size (o_proj, down_proj: N = 2048 or 3584 outputs) cuBLAS picks a kernel with few output
tiles and splits K, which costs a second reduce kernel. Here each program owns 16 or 32 output
columns over one slice of K, with rows padded to one 16-row tensor-core tile for `tl.dot` (free
in a memory-bound kernel) and Triton's pipeliner keeping several weight tiles in flight.

K may be split into slices, each its own program, so that more programs stream the weight; the
slices' fp32 partial sums [S, M, N] are not reduced here but by the kernel that reads the
product next: `fused_ops.add_rms_norm` (the residual add that follows o_proj and down_proj) or
`fused_ops.rotary_qk_store_kv` (q/k/v, with its bias), so the split costs no reduce kernel.
(Forming down_proj's silu(gate) * up inside the weight loop, to drop the silu*mul kernel, was
measured 3-14x slower: the padded 16-row tile makes every program evaluate 16 x K exponentials;
BENCHMARKS.md.)

(The GEMV's own last-arriving program doing that next kernel's work, on an arrival counter, was
built and measured slower on an H200 in every case: o_proj/down_proj with the add + norm in their
tail 1.2-2.6x slower alone at batch 1-8, the 7b batch-1 step 5.39 ms against 4.14 without it; the
q/k/v tail with rotary and the K/V write level at 1 row and 1.3-1.6x slower at 4-8. The tail ran
on one program (one a head) after all the others; why that cost more than the separate kernel,
which under programmatic dependent launch is resident before the GEMV ends, was not profiled.
BENCHMARKS.md, eighth pass.)

The MLP's gate and up projections (`silu_mul_project`) go the other way: K is the hidden size and
not split, and each program owns the same block of columns of gate and of up, so its epilogue has
both and writes silu(gate) * up itself: one kernel instead of cuBLAS's GEMM and the silu*mul one.

Under programmatic dependent launch (`fused_ops.PDL`) a kernel's programs are resident before the
kernel ahead of them has finished, waiting for it at `gdc_enter`. Only x depends on that kernel,
not the weights, so each projection program loads the first chunk of its weight slice before the
wait (`PREFETCH_WEIGHTS`): one K step, or `prefetch_k` of K where the config names it (a power
of two, cut to the slice). (The gate/up kernel, 32 K steps a
program, measured no gain from it, and its loop with the first step peeled off measured slower at
7b: BENCHMARKS.md; it keeps its plain loop.)

The kernel only reorders the fp32 sums of a dot product (as two GEMM kernels do); the sum is
rounded once, like cuBLAS's. `bench/gpu_gemv.py` measures both on the model shapes (BENCHMARKS.md,
section 1). `gemv_path(x, w)` says when it applies: Triton importable, CUDA 16-bit tensors,
1..MAX_ROWS rows; otherwise the torch ops run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epd.kernels.fused_ops import fused_path, gdc_enter, launch_options, silu_and_mul, tl, triton

MAX_ROWS = 8          # decode batches up to this many rows take the GEMV kernel
FUSED_GATE_UP = True  # gate/up + silu*mul as one kernel on the GEMV path (the bench turns it off)
PREFETCH_WEIGHTS = True   # projections load their first weight tile before the PDL wait (the bench turns it off)
_ROW_TILE = 16        # rows padded to one tensor-core tile


def gemv_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (fused_path(x) and 0 < x.shape[0] <= MAX_ROWS and weight.dtype == x.dtype
            and weight.is_contiguous() and x.is_contiguous())


def project(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T. On the GEMV path: the fp32 partial sums [S, M, N] of S slices of
    K (what `add_rms_norm` takes as its delta); elsewhere the product [M, N] in x's dtype.
    `config` (block_n, block_k, warps, stages, split, and optionally prefetch_k) overrides
    `block_config` (the bench's sweep)."""
    if not gemv_path(x, weight):
        return F.linear(x, weight)
    cfg = block_config(*weight.shape) if config is None else config
    m = x.shape[0]
    n, k = weight.shape
    block_k = cfg["block_k"]
    k_blocks = triton.cdiv(k, block_k)
    split = min(cfg["split"], k_blocks)
    per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k, per_split)                 # no empty slice
    first_k = max(cfg.get("prefetch_k", block_k), block_k)
    while first_k > per_split:                        # the first chunk stays inside the slice
        first_k //= 2
    parts = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg["block_n"]), split)](
        x, weight, parts, m, n, k, per_split, BLOCK_M=_ROW_TILE, BLOCK_N=cfg["block_n"], BLOCK_K=block_k,
        FIRST_K=first_k, PREFETCH=PREFETCH_WEIGHTS, num_warps=cfg["warps"], num_stages=cfg["stages"],
        **launch_options(x, m))
    return parts


def linear(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """`project` with its partial sums added and rounded: [M, N] in x's dtype (tests, benches)."""
    out = project(x, weight, config)
    return out.sum(0).to(x.dtype) if out.dim() == 3 else out


def silu_mul_project(x: torch.Tensor, gate_up: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T): [M, I] in x's dtype, for gate_up [2 I, K] (gate's rows, then
    up's). Rounded where torch rounds the unfused ops: gate and up to x's dtype, then silu, then the
    product. `config` (block_n, block_k, warps, stages) overrides `act_config` (the bench's sweep)."""
    if not (FUSED_GATE_UP and gemv_path(x, gate_up)):
        return silu_and_mul(F.linear(x, gate_up))
    m, k = x.shape
    inter = gate_up.shape[0] // 2
    cfg = act_config(inter, k) if config is None else config
    out = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    _silu_mul_gemv_kernel[(triton.cdiv(inter, cfg["block_n"]),)](
        x, gate_up, out, m, inter, k, BLOCK_M=_ROW_TILE, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        num_warps=cfg["warps"], num_stages=cfg["stages"], **launch_options(x, m))
    return out


def act_config(inter: int, k: int) -> dict:
    """Block config for `silu_mul_project`, the best of the sweep in bench/gpu_gemv.py on an H200
    (2026-11-29, the same for 1, 4 and 8 rows): 32 columns of gate and of up a program (3b: 344
    programs, 7b: 592), 64-wide K steps; 4 stages for K = 2048 (3b), 3 for K = 3584 (7b), where 4
    measured 1.4x slower."""
    return {"block_n": 32, "block_k": 64, "warps": 4, "stages": 4 if k < 3072 else 3}


def block_config(n: int, k: int) -> dict:
    """Block config for an [n x k] weight: the best of bench/gpu_gemv.py's sweep on an H200 (run Z3,
    2026-11-30, 1 row), ranked by the time of the GEMV with the kernel after it (rotary for q/k/v,
    add + norm for o_proj / down_proj), microseconds against the previous config (32 columns,
    256-wide K steps, K in 4 slices for 3b, 3 for 7b):
    - q/k/v (more outputs than inputs): 32 columns, 64-wide K steps, K in 8 slices
      (3b 6.10 against 6.82, 7b 11.33 against 13.23);
    - 3b o_proj and down_proj: 64 columns, 128-wide K steps, 8 slices (5.68 / 14.89 against
      5.99 / 15.42); 7b o_proj the same in 4 slices (10.18 against 10.96);
    - 7b down_proj keeps the previous config (36.46; the sweep's best, 36.35, is within noise)."""
    if n > k:
        return {"block_n": 32, "block_k": 64, "warps": 4, "stages": 3, "split": 8}
    if n < 3072:
        return {"block_n": 64, "block_k": 128, "warps": 4, "stages": 3, "split": 8}
    if k < 8192:
        return {"block_n": 64, "block_k": 128, "warps": 4, "stages": 3, "split": 4}
    return {"block_n": 32, "block_k": 256, "warps": 4, "stages": 3, "split": 3}


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, parts_ptr, M, N, K, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, FIRST_K: tl.constexpr, PREFETCH: tl.constexpr, USE_GDC: tl.constexpr):
        """This program's share of x @ w.T: its BLOCK_N columns over its slice of K, stored as fp32
        partial sums parts[slice, :M, columns]. The slice's first FIRST_K (a multiple of BLOCK_K, at
        most the slice) are one load and one dot, then BLOCK_K steps."""
        rows = tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        split = tl.program_id(1)
        k_start = split * K_PER_SPLIT
        k_end = tl.minimum(K, k_start + K_PER_SPLIT)
        w_cols = w_ptr + cols[None, :].to(tl.int64) * K           # [1, BLOCK_N]: columns of w.T
        x_rows = x_ptr + rows[:, None] * K
        # the slice's first chunk (no slice is empty), loaded before waiting for the kernel before
        # (PDL) when PREFETCH: weights do not depend on it, only x does
        k_first = k_start + tl.arange(0, FIRST_K)
        first_mask = k_first < K
        if PREFETCH:
            w_first = tl.load(w_cols + k_first[:, None], mask=first_mask[:, None] & cmask[None, :], other=0.0)
            gdc_enter(USE_GDC)
        else:
            gdc_enter(USE_GDC)
            w_first = tl.load(w_cols + k_first[:, None], mask=first_mask[:, None] & cmask[None, :], other=0.0)
        h_first = tl.load(x_rows + k_first[None, :], mask=rmask[:, None] & first_mask[None, :], other=0.0)
        acc = tl.dot(h_first, w_first, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        for k0 in range(k_start + FIRST_K, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K   # slices are whole blocks, so only K's end cuts one. Masking on the slice
            # end instead measured 1.3x slower (BENCHMARKS.md), presumably as Triton's divisible-by-16
            # specialization covers K but not the slice end, so the masked loads lose their width
            h = tl.load(x_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_cols + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(h, w, acc)
        tl.store(parts_ptr + (split * M + rows[:, None]) * N + cols[None, :], acc,
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _silu_mul_gemv_kernel(x_ptr, w_ptr, out_ptr, M, INTER, K,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              USE_GDC: tl.constexpr):
        rows = tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < INTER
        gdc_enter(USE_GDC)
        gate_cols = w_ptr + cols[None, :].to(tl.int64) * K                 # rows `cols` of gate_up
        up_cols = w_ptr + (cols[None, :] + INTER).to(tl.int64) * K          # rows INTER + `cols`
        x_rows = x_ptr + rows[:, None] * K
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            wmask = kmask[:, None] & cmask[None, :]
            h = tl.load(x_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc_gate = tl.dot(h, tl.load(gate_cols + kk[:, None], mask=wmask, other=0.0), acc_gate)
            acc_up = tl.dot(h, tl.load(up_cols + kk[:, None], mask=wmask, other=0.0), acc_up)
        dtype = out_ptr.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * INTER + cols[None, :], (silu * up).to(dtype),
                 mask=rmask[:, None] & cmask[None, :])
