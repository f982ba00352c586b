"""Routed experts on the GPU without a host sync: grouped GEMMs in Triton (CUDA-graph safe).

A token picks k experts; each (token, pick) pair is one row of the expert's MLP
`down(silu(gate) * up)` of the token's input scaled by the pick's score. `grouped_experts_fused`:

1. `expert_blocks` (torch ops of static shapes): pairs sorted by expert, each expert's run padded
   to a multiple of BLOCK_M rows; per block the expert it belongs to (-1: past the last one). The
   padded length is bounded by pairs + experts x (BLOCK_M - 1), so no count reaches the host.
2. `_gate_up_kernel`, grid (blocks, I / BLOCK_N): a block's rows (gathered token rows, scaled by
   their scores) times its expert's gate and up columns, silu(gate) * up into the intermediate.
3. `_down_kernel`, grid (blocks, H / BLOCK_N): the intermediate times the expert's down matrix,
   stored at each row's pair; the k picks of a token are then summed.

The torch reference is `epd.models`' per-expert loop; both agree to the dtype's rounding.
"""

from __future__ import annotations

import torch

from epd.kernels.fused_ops import tl, triton

BLOCK_M = 16


def expert_blocks(expert_ids: torch.Tensor, num_experts: int,
                  block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> (pair of each padded row [P] (T*k: padding), expert of each block [P / block_m]
    (-1: no expert)), P = T*k + num_experts * (block_m - 1) rounded up to block_m. A pair of expert id
    `num_experts` (another process's expert, tensor parallelism) gets no row: its output stays zero."""
    flat = expert_ids.reshape(-1)
    pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)   # (bincount syncs on CUDA)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:num_experts]               # id num_experts: another process's expert, dropped
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    sorted_experts = flat[order]
    kept = sorted_experts < num_experts         # the dropped pairs sort last
    expert_of = sorted_experts.clamp(max=num_experts - 1)
    rank = torch.arange(pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    total = -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m
    rows = torch.full((total + 1,), pairs, dtype=torch.int32, device=flat.device)   # + a slot the dropped land in
    rows[torch.where(kept, (ends - padded)[expert_of] + rank, total)] = order.to(torch.int32)
    rows = rows[:total]
    block_starts = torch.arange(0, total, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    return rows, torch.where(block_expert < num_experts, block_expert, -1)


def grouped_experts_fused(x: torch.Tensor, scores: torch.Tensor, expert_ids: torch.Tensor,
                          gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """x [T, H]; scores, expert_ids [T, k]; gate_up_proj [E, H, 2I]; down_proj [E, I, H] -> [T, H]."""
    num_tokens, top_k = expert_ids.shape
    experts, hidden, inter = gate_up_proj.shape[0], x.shape[1], down_proj.shape[1]
    rows, block_expert = expert_blocks(expert_ids, experts)
    x, scores = x.contiguous(), scores.reshape(-1).contiguous()
    mid = torch.empty(rows.numel(), inter, dtype=x.dtype, device=x.device)
    pair_out = torch.zeros(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    n_blocks, block_n, block_k = block_expert.numel(), 64, 64
    _gate_up_kernel[(n_blocks, triton.cdiv(inter, block_n))](
        x, scores, rows, block_expert, gate_up_proj, mid, num_tokens * top_k, hidden, inter, top_k,
        gate_up_proj.stride(0), gate_up_proj.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4)
    _down_kernel[(n_blocks, triton.cdiv(hidden, block_n))](
        mid, rows, block_expert, down_proj, pair_out, num_tokens * top_k, hidden, inter,
        down_proj.stride(0), down_proj.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return pair_out.view(num_tokens, top_k, hidden).sum(dim=1)


if triton is not None:

    @triton.jit
    def block_pairs(rows_ptr, block, PAIRS, BLOCK_M: tl.constexpr):
        """A block's padded rows (`expert_blocks` layout), the pair each holds, and which are real."""
        m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(rows_ptr + m)
        return m, pair, pair < PAIRS

    @triton.jit
    def _gate_up_kernel(x_ptr, score_ptr, rows_ptr, block_expert_ptr, w_ptr, mid_ptr, PAIRS, H, INTER, TOP_K,
                        w_stride_e, w_stride_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert >= 0:
            m, pair, live = block_pairs(rows_ptr, block, PAIRS, BLOCK_M)
            token = tl.where(live, pair // TOP_K, 0)
            score = tl.load(score_ptr + pair, mask=live, other=0.0)
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = n < INTER
            w = w_ptr + expert.to(tl.int64) * w_stride_e
            gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                kmask = k < H
                a = tl.load(x_ptr + token[:, None].to(tl.int64) * H + k[None, :], mask=live[:, None] & kmask[None, :],
                            other=0.0)
                a = (a * score[:, None]).to(a.dtype)                      # the pick's score scales its input
                wk = w + k[:, None].to(tl.int64) * w_stride_h
                bg = tl.load(wk + n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
                bu = tl.load(wk + (INTER + n)[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
                gate = tl.dot(a, bg, gate)
                up = tl.dot(a, bu, up)
            dtype = x_ptr.dtype.element_ty
            gate = gate.to(dtype).to(tl.float32)                          # rounded as the matmul's output
            up = up.to(dtype).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype) * up.to(dtype)
            tl.store(mid_ptr + m[:, None].to(tl.int64) * INTER + n[None, :], act, mask=nmask[None, :])

    @triton.jit
    def _down_kernel(mid_ptr, rows_ptr, block_expert_ptr, w_ptr, out_ptr, PAIRS, H, INTER, w_stride_e, w_stride_i,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert >= 0:
            m, pair, live = block_pairs(rows_ptr, block, PAIRS, BLOCK_M)
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = n < H
            w = w_ptr + expert.to(tl.int64) * w_stride_e
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, INTER, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                kmask = k < INTER
                a = tl.load(mid_ptr + m[:, None].to(tl.int64) * INTER + k[None, :], mask=kmask[None, :], other=0.0)
                b = tl.load(w + k[:, None].to(tl.int64) * w_stride_i + n[None, :], mask=kmask[:, None] & nmask[None, :],
                            other=0.0)
                acc = tl.dot(a, b, acc)
            out = out_ptr + pair[:, None].to(tl.int64) * H + n[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & nmask[None, :])
