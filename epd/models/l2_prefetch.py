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
- the add + norm after o_proj, for the first `GATE_UP_BYTES` of gate/up's weight;
- the add + norm after down_proj, for the next layer's q/k/v weight.
The asking is done by extra programs of those kernels (`PROGRAMS` of them, on their own SMs, so
no one copy engine has to issue it all), which touch nothing the kernel before wrote and so do not
wait for it (`gdc_enter`): under PDL they run while that kernel is still finishing. A prefetch
changes no value, only where the bytes come from. Only where PDL is on (sm90+, decode steps of up
to `fused_ops.PDL_MAX_ROWS` tokens), and only with `L2_PREFETCH` on: it is off until a GPU run
measures it (`bench.gpu_bench`'s `decode_with_l2_prefetch_*` variants; BENCHMARKS.md).
"""

from __future__ import annotations

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
_MAX_BYTES = (1 << 31) - 16   # the kernels take the byte count as a 32-bit integer

prefetch_to_l2 = None      # the Triton helper below, where Triton is importable


def whole(weight: torch.Tensor | None) -> tuple[torch.Tensor, int] | None:
    """A prefetch of all of `weight`."""
    return None if weight is None else (weight, weight.numel() * weight.element_size())


def first(weight: torch.Tensor | None, nbytes: int) -> tuple[torch.Tensor, int] | None:
    """A prefetch of the first `nbytes` of `weight` (all of it if smaller)."""
    return None if weight is None or nbytes <= 0 else (weight, min(nbytes, weight.numel() * weight.element_size()))


def launch_args(prefetch: tuple[torch.Tensor, int] | None, pdl_on: bool, placeholder: torch.Tensor,
                warps: int, programs_a_row: int) -> tuple[int, dict]:
    """(extra grid rows, kernel arguments) for a kernel that asks for `prefetch` = (tensor, bytes)
    with extra rows of `programs_a_row` programs each along its grid's axis 0; `pdl_on` is the
    launch's PDL switch (`fused_ops.launch_options`). No prefetch: no extra rows, PF_PIECES 0."""
    if prefetch is None or not (pdl_on and L2_PREFETCH) or prefetch[1] < 16 or not prefetch[0].is_contiguous():
        return 0, {"pf_ptr": placeholder, "pf_bytes": 0, "PF_PIECES": 0}
    weight, nbytes = prefetch
    rows = triton.cdiv(PROGRAMS, programs_a_row)
    return rows, {"pf_ptr": weight, "pf_bytes": min(nbytes, _MAX_BYTES) // 16 * 16, "PF_PIECES": 32 * warps}


if triton is not None:

    @triton.jit
    def prefetch_to_l2(pf_ptr, pf_bytes, index, count, PIECES: tl.constexpr):
        """Program `index` of `count` asks for its share of the bytes [pf_ptr, pf_ptr + pf_bytes)
        in L2, as PIECES bulk prefetches (one a thread), each a multiple of 16 bytes at a 16-byte
        aligned address (what the instruction takes; pf_bytes is a multiple of 16)."""
        piece = tl.cdiv(tl.cdiv(pf_bytes, count * PIECES), 16) * 16
        starts = (index * PIECES + tl.arange(0, PIECES)).to(tl.int64) * piece
        sizes = tl.minimum(tl.maximum(pf_bytes - starts, 0), piece).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [pf_ptr.to(tl.pointer_type(tl.int8)) + starts, sizes], dtype=tl.int32, is_pure=False,
            pack=1)
