"""The fused GPU kernels compute what the torch code they replace computes (bf16, fresh random inputs)."""

from __future__ import annotations

import pytest
import torch

from epd.kernels import fused_ops as fo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16 = torch.bfloat16


def _close(a: torch.Tensor, b: torch.Tensor, ulps: float = 2.0) -> None:
    # bf16 has 8 mantissa bits: allow a couple of units in the last place of each value
    tol = ulps * 2.0 ** -7 * b.float().abs().clamp_min(1e-2)
    assert ((a.float() - b.float()).abs() <= tol).all(), (a.float() - b.float()).abs().max()


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_add_rms_norm(tokens):
    x, d = (torch.randn(tokens, 3584, device="cuda", dtype=BF16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(3584, device="cuda")).to(BF16)
    res, out = fo.add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(res, x + d)
    _close(out, fo.rms_norm_ref(x + d, w, 1e-6))
    _, out0 = fo.add_rms_norm(x, None, w, 1e-6)
    _close(out0, fo.rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("parts", [1, 3])
def test_add_rms_norm_adds_up_split_k_partial_sums(parts):
    """A split-K projection's fp32 partials as the delta: the same as their total rounded to bf16."""
    x = torch.randn(5, 2048, device="cuda", dtype=BF16)
    partials = torch.randn(parts, 5, 2048, device="cuda")
    w = (1 + 0.1 * torch.randn(2048, device="cuda")).to(BF16)
    delta = partials[0].clone()
    for p in partials[1:]:
        delta += p
    res, out = fo.add_rms_norm(x, partials, w, 1e-6)
    ref_res, ref_out = fo.add_rms_norm(x, delta.to(BF16), w, 1e-6)
    assert torch.equal(res, ref_res) and torch.equal(out, ref_out)


def test_rotary_qk_and_store_kv():
    t, hq, hk, d = 37, 28, 4, 128
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=BF16)
    ang = torch.rand(t, d // 2, device="cuda") * 100
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(BF16) for f in (torch.cos, torch.sin))
    ref_q = fo.apply_rotary_ref(qkv[:, :hq * d].view(t, hq, d), cos, sin)
    ref_k = fo.apply_rotary_ref(qkv[:, hq * d:(hq + hk) * d].view(t, hk, d), cos, sin)
    v = qkv[:, (hq + hk) * d:].clone()
    q = fo.rotary_qk(qkv, cos, sin, hq, hk)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    assert torch.allclose(q.float(), ref_q.float(), atol=0.05, rtol=0.02)
    assert torch.allclose(k.float(), ref_k.float(), atol=0.05, rtol=0.02)
    assert torch.equal(qkv[:, (hq + hk) * d:], v)
    cache = torch.full((20, 2, 16, hk, d), float("nan"), device="cuda", dtype=BF16)
    slots = torch.randperm(20 * 16, device="cuda")[:t]
    fo.store_kv(cache, k, v.view(t, hk, d), slots)
    assert torch.equal(cache[slots // 16, 0, slots % 16], k)
    assert torch.equal(cache[slots // 16, 1, slots % 16], v.view(t, hk, d))
    assert cache.isnan().sum() == cache.numel() - 2 * t * hk * d, "wrote outside the given slots"


@pytest.mark.parametrize("tokens", [1, 37])
def test_rotary_qk_store_kv_equals_rotary_then_store(tokens):
    hq, hk, d, ps = 16, 2, 128, 16
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device="cuda", dtype=BF16)
    ang = torch.rand(tokens, d // 2, device="cuda") * 100
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(BF16) for f in (torch.cos, torch.sin))
    slots = torch.randperm(20 * ps, device="cuda")[:tokens]
    fused = torch.full((20, 2, ps, hk, d), float("nan"), device="cuda", dtype=BF16)
    untouched = qkv.clone()
    q = fo.rotary_qk_store_kv(qkv, cos, sin, hq, hk, fused, slots)
    assert torch.equal(qkv, untouched), "qkv must be left as it was"
    ref = fused.clone()
    ref_q = fo.rotary_qk(qkv, cos, sin, hq, hk)      # rotates k inside qkv
    fo.store_kv(ref, qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d), qkv[:, (hq + hk) * d:].view(tokens, hk, d),
                slots)
    assert torch.equal(q, ref_q)
    assert torch.equal(fused.nan_to_num(7.0), ref.nan_to_num(7.0)), "K/V or untouched slots differ"


@pytest.mark.parametrize("parts", [1, 4])
def test_rotary_qk_store_kv_adds_up_split_k_partials_and_bias(parts):
    """q/k/v from a split-K GEMV's fp32 partials plus the projection's bias: the same q and cache as
    from their total rounded once to bf16."""
    tokens, hq, hk, d, ps = 3, 16, 2, 128, 16
    partials = torch.randn(parts, tokens, (hq + 2 * hk) * d, device="cuda")
    bias = torch.randn((hq + 2 * hk) * d, device="cuda").to(BF16)
    ang = torch.rand(tokens, d // 2, device="cuda") * 100
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(BF16) for f in (torch.cos, torch.sin))
    slots = torch.randperm(20 * ps, device="cuda")[:tokens]
    got, ref = (torch.full((20, 2, ps, hk, d), float("nan"), device="cuda", dtype=BF16) for _ in range(2))
    total = partials[0].clone()
    for p in partials[1:]:
        total += p
    q = fo.rotary_qk_store_kv(partials, cos, sin, hq, hk, got, slots, bias=bias)
    ref_q = fo.rotary_qk_store_kv((total + bias.float()).to(BF16), cos, sin, hq, hk, ref, slots)
    assert torch.equal(q, ref_q)
    assert torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0))


def test_silu_and_mul():
    gu = torch.randn(9, 2 * 18944, device="cuda", dtype=BF16)
    g, u = gu[:, :18944], gu[:, 18944:]
    _close(fo.silu_and_mul(gu), torch.nn.functional.silu(g) * u)
