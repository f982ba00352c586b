"""The prefill node's embedding arena (CUDA IPC hand-over of image embeddings): its row allocator,
taking a request's rows, fences for dropped requests, and which encoder may write into which
prefill node. The write itself through CUDA IPC is tests/gpu/test_embedding_ipc.py."""

from __future__ import annotations

import time

import pytest
import torch

from epd import protocol
from epd.node.embedding_arena import EmbeddingArena, RowAllocator
from kv_transfer.cuda_ipc import IpcCapability, host_key, ipc_pairable, ipc_writable

GPU0, GPU1 = "GPU-aaaa", "GPU-bbbb"


def test_rows_are_reserved_first_fit_and_freed_ranges_merge():
    rows = RowAllocator(100)
    a, b, c = rows.reserve(30), rows.reserve(30), rows.reserve(30)
    assert (a, b, c) == (0, 30, 60) and rows.reserve(11) is None and rows.rows_free == 10
    rows.free(b)
    assert rows.reserve(31) is None, "30 + 10 free rows, but not contiguous"
    rows.free(a)
    assert rows.reserve(60) == 0, "the two freed neighbours merged"
    rows.free(0)
    rows.free(c)
    assert rows.rows_free == 100 and rows.reserve(100) == 0
    with pytest.raises(ValueError):
        rows.reserve(0)


def test_a_request_takes_its_images_rows_as_copies_and_frees_them():
    arena = EmbeddingArena(64, 8, torch.float32, "cpu", owner="prefill-1")
    first = arena.reserve("r1", 10)
    assert arena.reserve("big", 60) is None and arena.reserve("huge", 1000) is None
    arena.rows[first:first + 10] = torch.arange(80, dtype=torch.float32).view(10, 8)
    images = arena.take("r1", [4, 6])
    assert [t.shape for t in images] == [(4, 8), (6, 8)]
    assert torch.equal(torch.cat(images), torch.arange(80, dtype=torch.float32).view(10, 8))
    arena.rows.zero_()   # the rows are free again: what was taken must not change
    assert images[1][0, 0].item() == 32.0
    assert "r1" not in arena.held and arena.allocator.rows_free == 64
    arena.reserve("r2", 5)
    with pytest.raises(ValueError, match="4 embedding rows for a slot of 5"):
        arena.take("r2", [4])


def test_a_dropped_request_s_rows_stay_fenced_until_released_or_timed_out():
    arena = EmbeddingArena(16, 4, torch.float32, "cpu", owner="prefill-1", fence_timeout_s=0.05)
    arena.reserve("gone", 16)
    arena.fence("gone")
    assert arena.expire_fences() == [] and arena.reserve("next", 1) is None, "the encoder may still write"
    time.sleep(0.06)
    assert arena.expire_fences() == ["gone"] and arena.reserve("next", 16) == 0
    arena.fence("next")
    arena.release("next")   # its message landed
    assert not arena.fenced and arena.allocator.rows_free == 16


def _cap(gpu: str, visible: tuple[str, ...], host: str = "", page_size: int = 16) -> str:
    return IpcCapability(host or host_key(), page_size, gpu, visible).to_wire()


def test_an_encoder_writes_into_a_prefill_arena_only_on_a_gpu_it_sees_on_its_host():
    assert ipc_writable(_cap(GPU0, (GPU0, GPU1), page_size=1), _cap(GPU1, (GPU1,)))
    assert not ipc_writable(_cap(GPU0, (GPU0,), page_size=1), _cap(GPU1, (GPU1,)))
    assert not ipc_writable(_cap(GPU0, (GPU0,), host="other-machine:ipc"), _cap(GPU0, (GPU0,)))
    assert not ipc_writable("", _cap(GPU0, (GPU0,))) and not ipc_writable(_cap(GPU0, (GPU0,)), "")
    # page sizes matter to the KV pages, not to embedding rows
    assert not ipc_pairable(_cap(GPU0, (GPU0,), page_size=1), _cap(GPU0, (GPU0,)))


def test_an_embedding_slot_out_of_range_is_refused_on_the_wire():
    slot = protocol.EmbeddingSlot("r1", {"id": "a"}, 0, 12)
    assert protocol.read_data_meta(protocol.data_meta(slot), protocol.EmbeddingSlot, "r1") == slot
    for first_row, rows in ((-1, 4), (0, 0), (0, protocol.MAX_TOKENS + 1)):
        bad = protocol.data_meta(protocol.EmbeddingSlot("r1", {}, 0, 1))
        bad["body"].update(first_row=first_row, rows=rows)
        with pytest.raises(protocol.ProtocolError):
            protocol.read_data_meta(bad, protocol.EmbeddingSlot, "r1")
