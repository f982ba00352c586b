"""Weights asked into the GPU's L2 cache ahead of the GEMV that streams them (decode, sm90+).

In a batch-1 decode layer the weight-streaming GEMVs alternate with kernels that hardly touch
HBM: rotary + KV write, split-KV attention and its merge (1 MB of KV at 3b, 1024 tokens), the
add + norms. While those run, HBM idles; and each GEMV pays its ramp (the first bytes of a stream
arrive about a microsecond after they are asked for) with nothing to hide it but programmatic
dependent launch, which only looks one kernel ahead. Here a kernel of that stretch asks the
memory system to bring a later GEMV's weight into L2 (`cp.async.bulk.prefetch.L2.global`: the
SM's copy engine fetches a byte range into L2; nothing returns to the program and nothing waits
for it), so that GEMV reads it from L2 (50 MB on an H100/H200):
- the rotary + KV-write kernel asks for o_proj's weight (attention and the merge run meanwhile);
- the add + norm after o_proj, for `GATE_UP_BYTES` of gate/up's weight: the first bytes of each
  row, which its kernel reads first;
- the add + norm after down_proj, for the next layer's q/k/v weight.
The asking is done by extra programs of those kernels (`PROGRAMS` of them, on their own SMs, so
no one copy engine has to issue it all), which touch nothing the kernel before wrote and so do not
wait for it (`gdc_enter`): under PDL they run while that kernel is still finishing. A prefetch
changes no value, only where the bytes come from. Only where PDL is on (sm90+, decode steps of up
to `fused_ops.PDL_MAX_ROWS` tokens), and only with `L2_PREFETCH` on: it is off until a GPU run
measures it (`bench.gpu_bench`'s `decode_with_l2_prefetch_*` variants; BENCHMARKS.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only hosts
    triton = None
    tl = None

L2_PREFETCH = False        # off until measured on a GPU (the bench turns it on)
PROGRAMS = 64              # extra programs a kernel launches to ask for a weight
GATE_UP_BYTES = 16 << 20   # how much of gate/up's weight the add + norm after o_proj asks for
_PIECE = 16 << 10          # a whole weight is asked for in pieces of this many bytes
_MAX_BYTES = (1 << 31) - 16   # the kernels take byte counts as 32-bit integers

prefetch_to_l2 = None      # the Triton helper below, where Triton is importable


class Prefetch(NamedTuple):
    """Segments of a tensor to ask for in L2: segment s is `seg_bytes` from byte s * `stride`, cut at
    the tensor's end. Every count a multiple of 16, as the instruction takes."""
    tensor: torch.Tensor
    segments: int
    stride: int
    seg_bytes: int


def whole(weight: torch.Tensor | None) -> Prefetch | None:
    """All of `weight`, in `_PIECE`-byte segments (None while `L2_PREFETCH` is off)."""
    if weight is None or not L2_PREFETCH:
        return None
    nbytes = weight.numel() * weight.element_size()
    return Prefetch(weight, -(-nbytes // _PIECE), _PIECE, _PIECE)


def row_heads(weight: torch.Tensor | None, nbytes: int) -> Prefetch | None:
    """About `nbytes` of `weight` [N, K], as the first bytes of every row: what a GEMV whose programs
    each walk their rows from K = 0 reads first (gate/up's kernel), rather than the first rows,
    which its programs would read only to their end, long after streaming the rest through L2.
    None while `L2_PREFETCH` is off."""
    if weight is None or not L2_PREFETCH or nbytes <= 0 or weight.dim() != 2:
        return None
    row_bytes = weight.shape[1] * weight.element_size()
    head = min(nbytes // weight.shape[0], row_bytes) // 16 * 16
    return Prefetch(weight, weight.shape[0], row_bytes, head) if head and row_bytes % 16 == 0 else None


def launch_args(prefetch: Prefetch | None, pdl_on: bool, placeholder: torch.Tensor, warps: int,
                programs_a_row: int) -> tuple[int, dict]:
    """(extra grid rows, kernel arguments) for a kernel that asks for `prefetch` with extra rows of
    `programs_a_row` programs each along its grid's axis 0; `pdl_on` is the launch's PDL switch
    (`fused_ops.launch_options`). No prefetch: no extra rows, PF_PIECES 0. (`whole` and
    `row_heads` give None while `L2_PREFETCH` is off, so a decode step builds nothing then.)"""
    nbytes = 0 if prefetch is None else prefetch.tensor.numel() * prefetch.tensor.element_size()
    if (prefetch is None or not pdl_on or not prefetch.tensor.is_contiguous()
            or prefetch.tensor.data_ptr() % 16 or nbytes > _MAX_BYTES or prefetch.seg_bytes < 16):
        return 0, {"pf_ptr": placeholder, "pf_segments": 0, "pf_stride": 0, "pf_seg_bytes": 0, "pf_total": 0,
                   "PF_PIECES": 0}
    return triton.cdiv(PROGRAMS, programs_a_row), {
        "pf_ptr": prefetch.tensor, "pf_segments": prefetch.segments, "pf_stride": prefetch.stride,
        "pf_seg_bytes": prefetch.seg_bytes, "pf_total": nbytes // 16 * 16, "PF_PIECES": 32 * warps}


if triton is not None:

    @triton.jit
    def prefetch_to_l2(pf_ptr, segments, stride, seg_bytes, total, index, count, PIECES: tl.constexpr):
        """Program `index` of `count` asks for its segments in L2 (segment s: `seg_bytes` from byte
        s * `stride` of pf_ptr, cut at `total`), PIECES at a time, one bulk prefetch a thread."""
        base = pf_ptr.to(tl.pointer_type(tl.int8))
        for first in range(index * PIECES, segments, count * PIECES):
            seg = first + tl.arange(0, PIECES)
            start = seg.to(tl.int64) * stride
            sizes = tl.where(seg < segments, tl.minimum(tl.maximum(total - start, 0), seg_bytes), 0).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                "mov.u32 $0, 0; }", "=r,l,r", [base + start, sizes], dtype=tl.int32, is_pure=False, pack=1)
