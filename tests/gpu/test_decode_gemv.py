"""The decode GEMV kernels compute what F.linear computes (bf16, the q/k/v, o_proj and down_proj shapes),
however K is split into slices; gate/up with silu*mul what the unfused ops compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epd.kernels import decode_gemv as g
from epd.kernels.fused_ops import silu_and_mul

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16 = torch.bfloat16


def _inputs(rows: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, device="cuda", dtype=BF16, generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(BF16)
    return x, w


def _as_accurate(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
    """No further from the float64 product than cuBLAS is (both round the fp32 sum once; they add
    the K products in a different order)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err_got, err_ref = (got.double() - exact).abs(), (ref.double() - exact).abs()
    assert err_got.max() <= 2 * err_ref.max(), (err_got.max().item(), err_ref.max().item())
    assert err_got.mean() <= 1.5 * err_ref.mean(), (err_got.mean().item(), err_ref.mean().item())


@pytest.mark.parametrize("rows", [1, 5, 8])
@pytest.mark.parametrize("k,n", [(2048, 2048), (11008, 2048), (3584, 3584), (18944, 3584), (2048, 2560),
                                 (3584, 4608), (1000, 72)])
def test_linear_is_as_accurate_as_f_linear(rows, k, n):
    x, w = _inputs(rows, k, n, seed=rows + k)
    _as_accurate(g.linear(x, w), F.linear(x, w), F.linear(x.double(), w.double()))


@pytest.mark.parametrize("split", [1, 2, 3, 7])
def test_every_k_split_gives_the_product(split):
    """However K is sliced (uneven last slice, more slices than blocks), the partials add up to it."""
    x, w = _inputs(4, 3000, 96, seed=split)
    cfg = dict(block_n=16, block_k=256, warps=4, stages=3, split=split)
    parts = g.project(x, w, config=cfg)
    assert parts.dtype == torch.float32 and parts.shape[1:] == (4, 96) and 1 <= parts.shape[0] <= split
    _as_accurate(parts.sum(0).to(BF16), F.linear(x, w), F.linear(x.double(), w.double()))


@pytest.mark.parametrize("prefetch_k", [128, 512, 4096])
@pytest.mark.parametrize("split", [1, 3, 8])
def test_a_wider_first_chunk_gives_the_product(prefetch_k, split):
    """The slice's first chunk loaded before the PDL wait may span several K steps (cut to the
    slice when wider): the partials still add up to the product, ragged K included."""
    x, w = _inputs(3, 3000, 96, seed=prefetch_k + split)
    cfg = dict(block_n=32, block_k=64, warps=4, stages=3, split=split, prefetch_k=prefetch_k)
    _as_accurate(g.linear(x, w, cfg), F.linear(x, w), F.linear(x.double(), w.double()))


def test_more_rows_than_the_gemv_path_takes_use_cublas():
    x, w = _inputs(g.MAX_ROWS + 1, 256, 64, seed=30)
    assert not g.gemv_path(x, w) and g.gemv_path(x[:g.MAX_ROWS], w)
    assert torch.equal(g.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k,inter", [(2048, 11008), (3584, 18944), (1000, 72)])
def test_silu_mul_project_is_as_accurate_as_the_unfused_ops(rows, k, inter):
    """One kernel for gate/up + silu*mul: no further from the float64 MLP activation than cuBLAS's
    gate/up GEMM followed by the silu*mul kernel."""
    x, w = _inputs(rows, k, 2 * inter, seed=rows + inter)
    assert g.gemv_path(x, w)
    exact_gate_up = F.linear(x.double(), w.double())
    exact = F.silu(exact_gate_up[:, :inter]) * exact_gate_up[:, inter:]
    _as_accurate(g.silu_mul_project(x, w), silu_and_mul(F.linear(x, w)), exact)
