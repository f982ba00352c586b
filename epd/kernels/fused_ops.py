"""Fused elementwise kernels for the language model on GPU (Triton), with torch fallbacks.

A decode step of a 7B model is ~14 GB of weight reads; at batch 1 every extra small kernel
(an RMSNorm written as eight torch ops, a rotary as ten) costs a few microseconds of its own,
and with ~28 layers that is milliseconds. These kernels fuse each group into one launch:

- `add_rms_norm(x, delta, weight, eps)`: x + delta (the residual add) then RMSNorm; delta may be
  the fp32 partial sums of a split-K projection (`decode_gemv.project`), added up here;
- `rotary_qk(qkv, cos, sin, hq, hk)`: rotary on q (written out contiguous) and k (in place);
- `rotary_qk_store_kv(qkv, cos, sin, hq, hk, cache, slots)`: rotary on q, and k rotated and v
  written straight into the paged cache (one launch per layer fewer in a decode step);
- `rotary_qkv_split(qkv, cos, sin, heads)`: a vision block's rotary, q/k/v split out for attention;
- `silu_and_mul(gate_up)`: silu(gate) * up;
- `store_kv(cache, k, v, slots)`: write the step's K/V into the paged cache.

On sm90+ GPUs the kernels (these, `decode_gemv`'s and the split-KV attention's) are launched, in
steps of at most `PDL_MAX_ROWS` tokens, with programmatic dependent launch (`launch_options`):
each may be scheduled while the kernel before it in the stream (or CUDA graph) is still
finishing, and waits for it (`griddepcontrol.wait`) before its first memory access, so what
overlaps is the launch and block scheduling, never a read or write.
A decode step is ~300 kernels of a few microseconds each, so that gap is a visible share of it.

Each follows the rounding of the torch code it replaces (a bf16 result rounded where torch
rounds), so the fused and unfused paths agree to bf16 precision. `fused_path(x)` says whether
the Triton path applies: CUDA tensors of 16-bit dtypes, Triton importable. Anything else (the
CPU, float32/float64) takes the torch path, bit-for-bit the original code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only hosts
    triton = None
    tl = None

_FUSED_DTYPES = (torch.bfloat16, torch.float16)
PDL = True                     # programmatic dependent launch where the GPU has it (the bench turns it off)
PDL_MAX_ROWS = 8               # only for launches over at most this many tokens (decode steps of the GEMV
                               # path); prefill measured 2-5% lower MFU with it on every launch (BENCHMARKS.md)
_PDL_CAPABLE: dict[int, bool] = {}


def fused_path(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.dtype in _FUSED_DTYPES


def pdl(x: torch.Tensor) -> bool:
    """Whether kernels on x's device are launched with programmatic dependent launch (sm90+)."""
    if not (PDL and x.is_cuda):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _PDL_CAPABLE:
        _PDL_CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _PDL_CAPABLE[index]


def launch_options(x: torch.Tensor, rows: int) -> dict:
    """The kernel arguments that switch programmatic dependent launch on or off for a launch over
    `rows` tokens on x's device."""
    on = rows <= PDL_MAX_ROWS and pdl(x)
    return {"USE_GDC": on, "launch_pdl": on}


# ---- torch references (the CPU path, and what the kernels must match) ----------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D], cos/sin: [T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


# ---- public ops ---------------------------------------------------------------------------------

def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x + delta, rms_norm(x + delta)); delta None means no add. x: [T, H]; delta: [T, H],
    or [S, T, H] float32 partial sums whose total, rounded to x's dtype, is the delta."""
    parts = delta is not None and delta.dim() == 3
    if not fused_path(x):
        if delta is not None:
            x = x + (delta.sum(0).to(x.dtype) if parts else delta)
        return x, rms_norm_ref(x, weight, eps)
    x = x.contiguous()
    t, n = x.shape
    out = torch.empty_like(x)
    res = torch.empty_like(x) if delta is not None else x
    if t:
        _add_rms_norm_kernel[(t,)](x, delta.contiguous() if delta is not None else x, weight, out, res, t, n, eps,
                                   HAS_DELTA=delta is not None, PARTS=delta.shape[0] if parts else 0,
                                   BLOCK=triton.next_power_of_2(n), num_warps=8, **launch_options(x, t))
    return res, out


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int,
              hk: int) -> torch.Tensor:
    """qkv: [T, (hq + 2 hk) * D] (contiguous), cos/sin: [T, D] -> q [T, hq, D] rotated.

    k (the next hk heads of each row) is rotated in place inside qkv; v is left alone.
    """
    t = qkv.shape[0]
    d = cos.shape[-1]
    if not fused_path(qkv):
        q = apply_rotary_ref(qkv[:, :hq * d].view(t, hq, d), cos, sin)
        k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
        k.copy_(apply_rotary_ref(k, cos, sin))
        return q
    q = torch.empty(t, hq, d, dtype=qkv.dtype, device=qkv.device)
    if t:
        _rotary_qk_kernel[(t, hq + hk)](qkv, cos, sin, q, qkv.stride(0), cos.stride(0), hq,
                                         HALF=d // 2, num_warps=1, **launch_options(qkv, t))
    return q


def rotary_qk_store_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hk: int,
                       cache: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: [T, (hq + 2 hk) * D] (contiguous), cos/sin: [T, D], cache: [P, 2, page_size, hk, D],
    slots: [T] int64 -> q [T, hq, D] rotated; rotated k and v are written to the cache slots.
    Same values as `rotary_qk` then `store_kv`; qkv is left untouched.

    qkv may instead be the fp32 partial sums [S, T, N] of a split-K projection
    (`decode_gemv.project`) that has `bias` still to add: the qkv is then their total plus the bias,
    rounded once to the cache's dtype (as a cuBLAS GEMM with a bias epilogue rounds)."""
    parts = qkv.dim() == 3
    t = qkv.shape[-2]
    d = cos.shape[-1]
    if not fused_path(cache) or not cache.is_contiguous() or (not parts and cache.dtype != qkv.dtype):
        if parts:
            total = qkv.sum(0) + (bias.float() if bias is not None else 0.0)
            qkv = total.to(cache.dtype)
        q = rotary_qk(qkv, cos, sin, hq, hk)
        store_kv(cache, qkv[:, hq * d:(hq + hk) * d].view(t, hk, d), qkv[:, (hq + hk) * d:].view(t, hk, d), slots)
        return q
    qkv = qkv.contiguous()
    q = torch.empty(t, hq, d, dtype=cache.dtype, device=qkv.device)
    if t:
        _rotary_qk_store_kv_kernel[(t, hq + 2 * hk)](
            qkv, bias if bias is not None else qkv, cos, sin, q, cache, slots, qkv.stride(-2), cos.stride(0),
            hq, hk, cache.shape[2], t, HALF=d // 2, PARTS=qkv.shape[0] if parts else 0,
            HAS_BIAS=parts and bias is not None, num_warps=1, **launch_options(cache, t))
    return q


def rotary_qkv_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A vision block's fused projection qkv: [S, 3 * heads * D], cos/sin: [S, D] (float32) -> q, k, v,
    each [S, heads, D] contiguous (what varlen attention takes); q and k rotated in float32 and
    rounded once, as transformers' vision rotary does, v copied."""
    s = qkv.shape[0]
    d = cos.shape[-1]
    if not fused_path(qkv):
        q, k, v = qkv.view(s, 3, heads, d).unbind(1)
        c, sn = cos[:, None, :].float(), sin[:, None, :].float()
        q, k = ((x.float() * c + rotate_half(x.float()) * sn).to(qkv.dtype) for x in (q, k))
        return q, k, v.contiguous()
    out = torch.empty(3, s, heads, d, dtype=qkv.dtype, device=qkv.device)
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    if s:
        _rotary_qkv_split_kernel[(s,)](qkv, cos, sin, out, qkv.stride(0), cos.stride(0), s, heads, HALF=d // 2,
                                       BLOCK=triton.next_power_of_2(d // 2), ROWS=triton.next_power_of_2(3 * heads),
                                       num_warps=4, **launch_options(qkv, s))
    return out[0], out[1], out[2]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 I] -> silu(gate) * up: [T, I]."""
    inter = gate_up.shape[-1] // 2
    if not fused_path(gate_up):
        return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    t = gate_up.shape[0]
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if t:
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), BLOCK=block,
                                                          num_warps=4, **launch_options(gate_up, t))
    return out


def store_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """cache: [P, 2, page_size, Hkv, D]; k, v: [T, Hkv, D] (rows may be strided); slots: [T] int64
    flat slot (page * page_size + offset) of each new token."""
    ps = cache.shape[2]
    if not fused_path(cache) or not cache.is_contiguous() or k.stride(-1) != 1 or k.stride(-2) != k.shape[-1]:
        cache[slots // ps, 0, slots % ps] = k.to(cache.dtype)
        cache[slots // ps, 1, slots % ps] = v.to(cache.dtype)
        return
    t, hk, d = k.shape
    if t:
        width = hk * d
        _store_kv_kernel[(t,)](cache, k, v, slots, k.stride(0), v.stride(0), ps, width,
                               BLOCK=triton.next_power_of_2(width), num_warps=4, **launch_options(cache, t))


# ---- kernels -------------------------------------------------------------------------------------

gdc_enter = None   # the Triton helper below, where Triton is importable

if triton is not None:

    @triton.jit
    def gdc_enter(USE_GDC: tl.constexpr):
        """First thing in a kernel launched with programmatic dependent launch: wait until the kernel
        before it has finished and its writes are visible, then let the next one be scheduled."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _add_norm_row(x_ptr, d_ptr, w_ptr, out_ptr, res_ptr, row, t, n, eps, HAS_DELTA: tl.constexpr,
                      PARTS: tl.constexpr, BLOCK: tl.constexpr):
        """One row of `add_rms_norm`, rounding where torch rounds: res = x + delta (delta: [t, n], or
        the total of PARTS fp32 partial sums [PARTS, t, n] rounded once), out = norm(res) * w."""
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            if PARTS > 0:   # fp32 partial sums [PARTS, t, n]: their total, rounded once
                d = tl.zeros([BLOCK], dtype=tl.float32)
                for part in tl.static_range(PARTS):
                    d += tl.load(d_ptr + (part * t + row) * n + cols, mask=mask, other=0.0)
                d = d.to(x_ptr.dtype.element_ty)
            else:
                d = tl.load(d_ptr + row * n + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)  # torch rounds the add
            tl.store(res_ptr + row * n + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
        y = (xf * rstd).to(x_ptr.dtype.element_ty)                                # then rounds the norm
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * n + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, res_ptr, t, n, eps,
                             HAS_DELTA: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr,
                             USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        _add_norm_row(x_ptr, d_ptr, w_ptr, out_ptr, res_ptr, tl.program_id(0).to(tl.int64), t, n, eps,
                      HAS_DELTA, PARTS, BLOCK)

    @triton.jit
    def _rotary_qk_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, row_stride, cs_stride, hq,
                          HALF: tl.constexpr, USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        i = tl.arange(0, HALF)
        src = qkv_ptr + tok * row_stride + head * (2 * HALF)
        x1 = tl.load(src + i).to(tl.float32)
        x2 = tl.load(src + HALF + i).to(tl.float32)
        c1 = tl.load(cos_ptr + tok * cs_stride + i).to(tl.float32)
        c2 = tl.load(cos_ptr + tok * cs_stride + HALF + i).to(tl.float32)
        s1 = tl.load(sin_ptr + tok * cs_stride + i).to(tl.float32)
        s2 = tl.load(sin_ptr + tok * cs_stride + HALF + i).to(tl.float32)
        o1 = (x1 * c1 - x2 * s1).to(q_ptr.dtype.element_ty)
        o2 = (x2 * c2 + x1 * s2).to(q_ptr.dtype.element_ty)
        if head < hq:
            dst = q_ptr + (tok * hq + head) * (2 * HALF)
        else:
            dst = src
        tl.store(dst + i, o1)
        tl.store(dst + HALF + i, o2)

    @triton.jit
    def _rotary_qk_store_kv_kernel(qkv_ptr, bias_ptr, cos_ptr, sin_ptr, q_ptr, cache_ptr, slot_ptr, row_stride,
                                   cs_stride, hq, hk, page_size, T, HALF: tl.constexpr, PARTS: tl.constexpr,
                                   HAS_BIAS: tl.constexpr, USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        _rotary_store_head(qkv_ptr, bias_ptr, cos_ptr, sin_ptr, q_ptr, cache_ptr, slot_ptr, row_stride,
                           cs_stride, hq, hk, page_size, T, tl.program_id(0).to(tl.int64), tl.program_id(1), HALF,
                           PARTS, HAS_BIAS)

    @triton.jit
    def _rotary_store_head(qkv_ptr, bias_ptr, cos_ptr, sin_ptr, q_ptr, cache_ptr, slot_ptr, row_stride, cs_stride,
                           hq, hk, page_size, T, tok, head, HALF: tl.constexpr, PARTS: tl.constexpr,
                           HAS_BIAS: tl.constexpr):
        """One head of one token of `rotary_qk_store_kv`: head < hq a q head (rotated into q), then hk
        k heads (rotated into the cache), then hk v heads (into the cache)."""
        i = tl.arange(0, HALF)
        if PARTS > 0:                      # fp32 partial sums [PARTS, T, N]: total + bias, rounded once
            f1 = tl.zeros([HALF], dtype=tl.float32)
            f2 = tl.zeros([HALF], dtype=tl.float32)
            for part in tl.static_range(PARTS):
                src = qkv_ptr + (part * T + tok) * row_stride + head * (2 * HALF)
                f1 += tl.load(src + i)
                f2 += tl.load(src + HALF + i)
            if HAS_BIAS:
                f1 += tl.load(bias_ptr + head * (2 * HALF) + i).to(tl.float32)
                f2 += tl.load(bias_ptr + head * (2 * HALF) + HALF + i).to(tl.float32)
            x1 = f1.to(q_ptr.dtype.element_ty)
            x2 = f2.to(q_ptr.dtype.element_ty)
        else:
            src = qkv_ptr + tok * row_stride + head * (2 * HALF)
            x1 = tl.load(src + i)
            x2 = tl.load(src + HALF + i)
        if head < hq + hk:                 # q and k rotate, rounding as `_rotary_qk_kernel` does
            c1 = tl.load(cos_ptr + tok * cs_stride + i).to(tl.float32)
            c2 = tl.load(cos_ptr + tok * cs_stride + HALF + i).to(tl.float32)
            s1 = tl.load(sin_ptr + tok * cs_stride + i).to(tl.float32)
            s2 = tl.load(sin_ptr + tok * cs_stride + HALF + i).to(tl.float32)
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            o1 = (f1 * c1 - f2 * s1).to(q_ptr.dtype.element_ty)
            o2 = (f2 * c2 + f1 * s2).to(q_ptr.dtype.element_ty)
        else:
            o1, o2 = x1, x2
        if head < hq:
            dst = q_ptr + (tok * hq + head) * (2 * HALF)
        else:
            slot = tl.load(slot_ptr + tok)
            kv = (head >= hq + hk).to(tl.int64)       # 0: K, 1: V
            kv_head = head - hq - kv * hk
            row = (slot // page_size * 2 + kv) * page_size + slot % page_size   # cache[page, kv, offset]
            dst = cache_ptr + (row * hk + kv_head) * (2 * HALF)
        tl.store(dst + i, o1)
        tl.store(dst + HALF + i, o2)

    @triton.jit
    def _rotary_qkv_split_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, row_stride, cs_stride, S, heads,
                                 HALF: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        tok = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, ROWS)[:, None]                # (q | k | v) * heads + head
        i = tl.arange(0, BLOCK)[None, :]
        m = (r < 3 * heads) & (i < HALF)
        src = qkv_ptr + tok * row_stride + r * (2 * HALF) + i
        f1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        f2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        cm = i < HALF
        c1 = tl.load(cos_ptr + tok * cs_stride + i, mask=cm, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + tok * cs_stride + HALF + i, mask=cm, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tok * cs_stride + i, mask=cm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + tok * cs_stride + HALF + i, mask=cm, other=0.0).to(tl.float32)
        rotate = r < 2 * heads                         # q and k; v passes through (exactly)
        o1 = tl.where(rotate, f1 * c1 - f2 * s1, f1).to(out_ptr.dtype.element_ty)
        o2 = tl.where(rotate, f2 * c2 + f1 * s2, f2).to(out_ptr.dtype.element_ty)
        dst = out_ptr + (((r // heads) * S + tok) * heads + r % heads) * (2 * HALF) + i
        tl.store(dst, o1, mask=m)
        tl.store(dst + HALF, o2, mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, row_stride, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(gu_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * row_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)  # torch rounds silu, then the product
        tl.store(out_ptr + row * inter + cols, (s.to(tl.float32) * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_kv_kernel(cache_ptr, k_ptr, v_ptr, slot_ptr, k_stride, v_stride, page_size, width,
                         BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        tok = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + tok)
        page = slot // page_size
        off = slot % page_size
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        k_dst = cache_ptr + (page * 2 * page_size + off) * width   # [page, 0, off]
        v_dst = k_dst + page_size * width                          # [page, 1, off]
        tl.store(k_dst + cols, tl.load(k_ptr + tok * k_stride + cols, mask=mask), mask=mask)
        tl.store(v_dst + cols, tl.load(v_ptr + tok * v_stride + cols, mask=mask), mask=mask)
