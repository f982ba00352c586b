"""The decode GEMV kernels compute what the torch ops they replace compute (bf16, the model shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epd.models import decode_gemv as g
from epd.models import fused_ops as fo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16 = torch.bfloat16


def _inputs(rows: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, device="cuda", dtype=BF16, generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(BF16)
    return x, w


@pytest.mark.parametrize("rows", [1, 5, 8])
@pytest.mark.parametrize("k,n", [(2048, 2048), (11008, 2048), (3584, 3584), (18944, 3584), (1000, 72)])
def test_linear_is_as_accurate_as_f_linear(rows, k, n):
    """No further from the float64 product than cuBLAS is (both round the fp32 sum once; they add
    the K products in a different order)."""
    x, w = _inputs(rows, k, n, seed=rows + k)
    _no_less_accurate(g.linear(x, w), F.linear(x, w), F.linear(x.double(), w.double()))


def test_more_rows_than_the_gemv_path_takes_use_cublas():
    x, w = _inputs(g.MAX_ROWS + 1, 256, 64, seed=30)
    assert not g.gemv_path(x, w) and g.gemv_path(x[:g.MAX_ROWS], w)
    assert torch.equal(g.linear(x, w), F.linear(x, w))


def _no_less_accurate(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
    """got is at most as far from the float64 value as the torch ops it replaces (ref) are."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err_got, err_ref = (got.double() - exact).abs(), (ref.double() - exact).abs()
    assert err_got.max() <= 2 * err_ref.max(), (err_got.max().item(), err_ref.max().item())
    assert err_got.mean() <= 1.5 * err_ref.mean(), (err_got.mean().item(), err_ref.mean().item())


def _norm_inputs(rows: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(rows, k, device="cuda", generator=gen) * 4).to(BF16)    # a residual stream, not unit scale
    gain = (1 + 0.2 * torch.randn(k, device="cuda", generator=gen)).to(BF16)
    return x, gain


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k,n", [(2048, 2560), (3584, 4608), (1000, 72)])
def test_norm_linear_equals_rms_norm_then_linear(rows, k, n):
    x, gain = _norm_inputs(rows, k, seed=k + rows)
    _, w = _inputs(rows, k, n, seed=n)
    bias = torch.randn(n, device="cuda").to(BF16)
    folded, unit = w.clone(), gain.clone()
    g.fold_norm_gain(unit, folded)
    assert torch.equal(unit, torch.ones_like(gain))
    got = g.norm_linear(x, 1e-6, folded, bias)
    ref = F.linear(fo.rms_norm_ref(x, gain, 1e-6), w, bias)
    exact = F.linear(fo.rms_norm_ref(x.double(), gain.double(), 1e-6), w.double(), bias.double())
    _no_less_accurate(got, ref, exact)


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("k,inter", [(2048, 11008), (3584, 18944), (1000, 40)])
def test_norm_gate_up_equals_norm_linear_silu_mul(rows, k, inter):
    x, gain = _norm_inputs(rows, k, seed=inter + rows)
    _, w = _inputs(rows, k, 2 * inter, seed=k)
    folded = w.clone()
    g.fold_norm_gain(gain.clone(), folded)
    got = g.norm_gate_up(x, 1e-6, folded)
    ref = fo.silu_and_mul(F.linear(fo.rms_norm_ref(x, gain, 1e-6), w))
    gate_up = F.linear(fo.rms_norm_ref(x.double(), gain.double(), 1e-6), w.double())
    exact = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    _no_less_accurate(got, ref, exact)


@pytest.mark.parametrize("rows", [1, 8])
def test_linear_add_equals_residual_plus_linear(rows):
    x, w = _inputs(rows, 11008, 2048, seed=rows)
    residual = torch.randn(rows, 2048, device="cuda").to(BF16) * 8
    assert torch.equal(g.linear_add(x, w, residual), residual + g.linear(x, w))   # same kernel, same sums
    _no_less_accurate(g.linear_add(x, w, residual), residual + F.linear(x, w),
                      residual.double() + F.linear(x.double(), w.double()))
