"""The attention metadata of a step: each request's context pages as flashinfer-style arrays
(what the GPU attention kernels and CUDA-graph buckets read), from page lists or from the
int32 copy a request keeps of its pages."""

from __future__ import annotations

import numpy as np
import torch

from epd.engine.attention.base import page_arrays
from epd.engine.model_runner import write_slots
from epd.engine.request import Request
from epd.engine.scheduler import Chunk


def _request(pages: list[int]) -> Request:
    # page_array() reads only `pages`; the other fields play no part here
    req = Request(rid="r", inp=None, params=None, detok=None, max_total_tokens=0)  # type: ignore[arg-type]
    req.pages = pages
    return req


def test_page_arrays_list_each_requests_context_pages_then_padding_rows():
    ps, lens = 16, [1, 16, 17, 300]
    rng = np.random.default_rng(0)
    tables = [[int(p) for p in rng.choice(np.arange(1, 1000), size=-(-n // ps) + 3, replace=False)] for n in lens]
    for given in (tables, [_request(t).page_array() for t in tables]):
        indptr, indices, last = page_arrays(lens, given, ps, pad_rows=2)
        counts = [1, 1, 2, 19, 1, 1]                 # pages holding each row's tokens; padding: one
        assert indptr.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
        assert indices.tolist() == [p for t, c in zip(tables, counts, strict=False) for p in t[:c]] + [0, 0]
        assert last.tolist() == [1, 16, 1, 12, 1, 1]
        assert indptr.dtype == indices.dtype == last.dtype == torch.int32


def test_a_requests_page_array_follows_its_pages_as_they_grow_and_are_replaced():
    req = _request([])
    assert req.page_array().tolist() == []
    expected: list[int] = []
    for step in range(50):                       # grows one page at a time, past the first capacity
        req.pages.extend([step + 7])
        expected.append(step + 7)
        assert req.page_array().tolist() == expected
        assert req.page_array().dtype == np.int32
    req.pages = [5, 6]                           # freed and re-allocated: a new list in its place
    assert req.page_array().tolist() == [5, 6]
    req.pages = []
    assert req.page_array().tolist() == []
    req.pages.extend([9, 10, 11])
    assert req.page_array().tolist() == [9, 10, 11]


def test_write_slots_are_each_new_tokens_page_and_offset_in_step_order():
    """A step mixing a prefill from the start, a prefill chunk mid-prompt and decode tokens: every
    token's K/V goes to page_table[pos // page_size] * page_size + pos % page_size."""
    ps = 16
    rng = np.random.default_rng(2)
    reqs = [_request([int(p) for p in rng.choice(np.arange(1, 500), size=40, replace=False)]) for _ in range(4)]
    chunks = [Chunk(reqs[0], 0, 37), Chunk(reqs[1], 300, 1), Chunk(reqs[2], 16, 200), Chunk(reqs[3], 639, 1)]
    got = write_slots(chunks, [r.page_array() for r in reqs], ps)
    want = [c.req.pages[i // ps] * ps + i % ps for c in chunks for i in range(c.start, c.start + c.length)]
    assert got.dtype == np.int64 and got.tolist() == want
