"""The split-KV decode kernels (what CUDA graphs capture) compute paged attention over each
request's pages, in any order, for GQA groups of 1-8 and any length, graph-replayed."""

from __future__ import annotations

import pytest
import torch

from epd.kernels.split_kv_decode import SplitKVGraphDecode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _reference(q, cache, tables, lens, ps) -> torch.Tensor:
    outs = []
    for i, (table, n) in enumerate(zip(tables, lens, strict=True)):
        pos = torch.arange(n, device="cuda")
        pages = torch.tensor(table, device="cuda")[pos // ps]
        k, v = cache[pages, 0, pos % ps].double(), cache[pages, 1, pos % ps].double()   # [n, hk, d]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[i].double(), k) / q.shape[2] ** 0.5
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outs)


@pytest.mark.parametrize("hq,hk,ps,lens,bucket", [
    (16, 2, 16, [1024], 1),                      # 3b, batch 1
    (28, 4, 16, [1, 17, 300, 4000], 8),          # 7b (GQA 7), padding rows, a long context
    (8, 8, 4, [5, 64, 129], 4),                  # no GQA, small pages
])
def test_split_kv_decode_matches_reference_in_a_graph(hq, hk, ps, lens, bucket):
    gen = torch.Generator(device="cuda").manual_seed(len(lens))
    pages_needed = sum(-(-n // ps) for n in lens)
    cache = torch.randn(pages_needed + 8, 2, ps, hk, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    order = (torch.randperm(pages_needed + 7, device="cuda", generator=gen) + 1).tolist()   # page 0: dummy
    tables, used = [], 0
    for n in lens:
        tables.append(order[used:used + -(-n // ps)])
        used += len(tables[-1])
    attn = SplitKVGraphDecode(hk, ps, bucket, torch.zeros(cache.shape[0] + bucket, dtype=torch.int32, device="cuda"))
    attn.slots = torch.zeros(bucket, dtype=torch.int64, device="cuda")
    q = torch.randn(bucket, hq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    attn.plan_padded([], [])
    graph = torch.cuda.CUDAGraph()
    attn.attend(q, None, None, cache)                # compile outside the capture
    with torch.cuda.graph(graph):
        out = attn.attend(q, None, None, cache)
    attn.plan_padded(lens, tables)                   # the captured kernels read the new page lists
    graph.replay()
    ref = _reference(q[:len(lens)], cache, tables, lens, ps)
    got = out[:len(lens)].double()
    assert ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 1e-2
    assert torch.isfinite(out).all(), "padding rows must not produce NaN/inf"
