"""A prefill node that cannot map the decode node's pool (its GPU is not visible here, the IPC
handle does not open) hands the KV over the wire instead: the real CUDA IPC sender and receiver
(`epd.node.ipc_handover`) over two real UCX transports holding the cluster secret, on CPU pools,
the mapping refused by the real `PoolImports`. The request completes with decode's pages holding
exactly prefill's KV, prefill's pages go back once, the warning comes once per decode pool, and
the wire KV is still taken only from the announced prefill node and only of the prompt's size.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from epd import protocol
from epd.engine.kv_pool import KVCache, KVCacheSpec
from epd.node.handover import CrossRowsKV, HandOverState, WireSender
from epd.node.ipc_handover import IpcReceiver, IpcSender, announce_page_list
from kv_transfer.auth import ClusterSecret
from kv_transfer.cuda_ipc import PoolImports, host_key
from kv_transfer.kv_codec import gather_kv
from kv_transfer.transport import KVTransport

LAYERS, PAGES, PAGE_SIZE, HEADS, DIM = 3, 12, 4, 2, 8
PROMPT_LEN = 10
PROMPT_PAGES = -(-PROMPT_LEN // PAGE_SIZE)


def _pool(seed: int | None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed or 0)
    return [torch.randn(PAGES, 2, PAGE_SIZE, HEADS, DIM, generator=gen) if seed is not None
            else torch.zeros(PAGES, 2, PAGE_SIZE, HEADS, DIM) for _ in range(LAYERS)]


def _unmappable_pool() -> dict:
    """What a decode node on a GPU this process cannot see exports (`cuda_ipc.export_pool`)."""
    return {"id": "decode-pool-1", "owner": "decode-1", "host": host_key(), "gpu": "GPU-not-visible-here",
            "dtype": "float32", "shape": [PAGES, 2, PAGE_SIZE, HEADS, DIM], "handles": [[0, b"\0" * 64]] * LAYERS}


@pytest.fixture(scope="module")
def transports(tmp_path_factory):
    secret = ClusterSecret.generate(str(tmp_path_factory.mktemp("secret") / "cluster.secret"))
    with KVTransport("127.0.0.1", secret=secret) as prefill, KVTransport("127.0.0.1", secret=secret) as decode, \
            KVTransport("127.0.0.1", secret=secret) as stranger:
        yield prefill, decode, stranger


def _until(step, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not step():
        assert time.monotonic() < deadline, "the hand-over did not end"
        time.sleep(0.005)


def _sender(prefill_t, decode_t, rid, pools, src, src_pages, released, cross: CrossRowsKV | None = None,
            ipc_tensors=None):
    """The prefill service's CUDA IPC sender: `src` token layers (and `cross`'s image rows), whose
    fallback sends them over the wire as one group."""
    cross = cross or CrossRowsKV([], 0)

    def wire(pages, cross_pages, release):
        return WireSender(prefill_t, decode_t.address, rid, src, [range(len(src))], pages, PROMPT_LEN, release, 10.0,
                          cross=CrossRowsKV(cross.layers, cross.rows, cross_pages))
    return IpcSender(prefill_t, decode_t.address, rid, pools, ipc_tensors or src, src_pages, PROMPT_PAGES,
                     released.append, 10.0, len(src) + len(cross.layers) - 1, wire, cross_pages=cross.pages,
                     cross_rows=cross.rows)


def _hand_over(prefill_t, decode_t, rid, pools, src, dst, src_pages, dst_pages, released, cross=(None, None)):
    """One request's hand-over, as the two services drive it; returns (sender, receiver). `cross`:
    the image rows' (prefill side, decode side) `CrossRowsKV`."""
    receiver = IpcReceiver(decode_t, prefill_t.address, rid, dst, PROMPT_LEN, cross=cross[1])   # DecodeRequest
    announce_page_list(prefill_t, decode_t.address, rid)                                # PrefillRequest
    receiver.start(_unmappable_pool(), dst_pages, cross[1].pages if cross[1] else None)   # pages reserved
    sender = _sender(prefill_t, decode_t, rid, pools, src, src_pages, released, cross[0])
    sender.on_layer(sender.last_layer)                                                  # the last layer ran
    sender.finish(protocol.HandOver(rid, first_token=42, prompt_len=PROMPT_LEN), None)  # first token sampled
    ends = (HandOverState.DONE, HandOverState.FAILED)
    _until(lambda: sender.poll() in ends and receiver.poll(time.monotonic()) in ends)
    return sender, receiver


def test_kv_goes_over_the_wire_when_decode_s_pool_cannot_be_mapped(transports, caplog):
    prefill_t, decode_t, _ = transports
    pools, src = PoolImports("cpu"), _pool(seed=1)
    caplog.set_level(logging.WARNING, logger="epd.node.ipc_handover")
    for i, (src_pages, dst_pages) in enumerate([([5, 0, 9, 11], [2, 7, 3]), ([1, 2, 3], [11, 10, 0])]):
        dst, released = _pool(seed=None), []
        sender, receiver = _hand_over(prefill_t, decode_t, f"fallback-{i}", pools, src, dst, src_pages, dst_pages,
                                      released)
        assert receiver.state is HandOverState.DONE, receiver.error
        assert sender.state is HandOverState.DONE, sender.error
        assert receiver.record.first_token == 42 and not receiver.record.ipc_written
        assert torch.equal(gather_kv(dst, dst_pages, PROMPT_LEN), gather_kv(src, src_pages, PROMPT_LEN))
        untouched = [p for p in range(PAGES) if p not in dst_pages]
        assert not any(layer[untouched].any() for layer in dst)
        assert released == [src_pages] and sender.pages == [], "prefill's pages go back exactly once"
        assert "over UCX" in sender.via and sender.nbytes >= LAYERS * 2 * PROMPT_LEN * HEADS * DIM * 4
    warnings = [r for r in caplog.records if "its KV goes over UCX instead" in r.getMessage()]
    assert len(warnings) == 1 and "cannot see" in warnings[0].getMessage()


def test_image_rows_go_over_the_wire_with_the_kv_when_the_shared_buffer_cannot_be_mapped(transports):
    """A cross-attention family's pool (one buffer of strided layer views): the fallback hands over
    the token layers' KV and the image rows, into decode's prompt and image-row pages."""
    prefill_t, decode_t, _ = transports
    spec = KVCacheSpec(6, HEADS, DIM, PAGE_SIZE, torch.float32, cross_layers=(1, 4))   # 2 slots a row page
    src, dst = KVCache(spec, PAGES, "cpu"), KVCache(spec, PAGES, "cpu")
    src.buffer.normal_(generator=torch.Generator().manual_seed(5))
    dst.buffer.zero_()
    token = lambda kv: [kv.layers[i] for i in (0, 2, 3, 5)]   # noqa: E731
    rows, released = 11, []
    sender, receiver = _hand_over(
        prefill_t, decode_t, "fallback-cross", PoolImports("cpu"), token(src), token(dst), [3, 1, 8], [9, 4, 2],
        released, cross=(CrossRowsKV([src.layers[1], src.layers[4]], rows, [6, 10]),
                         CrossRowsKV([dst.layers[1], dst.layers[4]], rows, [11, 5])))
    assert receiver.state is HandOverState.DONE and sender.state is HandOverState.DONE, receiver.error
    assert receiver.record.cross_rows == rows and not receiver.record.ipc_written
    assert torch.equal(gather_kv(token(dst), [9, 4, 2], PROMPT_LEN), gather_kv(token(src), [3, 1, 8], PROMPT_LEN))
    assert torch.equal(gather_kv([dst.layers[1], dst.layers[4]], [11, 5], rows),
                       gather_kv([src.layers[1], src.layers[4]], [6, 10], rows))
    assert not dst.buffer[[p for p in range(PAGES) if p not in (9, 4, 2, 11, 5)]].any()
    assert released == [[3, 1, 8, 6, 10]], "prefill's prompt and image-row pages go back once"


def _stray_group(rid: str, nbytes_factor: int = 1) -> tuple[str, list[torch.Tensor], dict]:
    wire = torch.ones(LAYERS, 2, PROMPT_LEN * nbytes_factor, HEADS, DIM)
    return f"{rid}:kv:0", [wire], protocol.data_meta(protocol.KVGroup(rid, 0, [0, LAYERS]))


@pytest.mark.parametrize("who", ["stranger", "prefill, too large"])
def test_wire_kv_for_an_ipc_request_is_taken_only_from_its_prefill_node_and_of_its_size(transports, who):
    prefill_t, decode_t, stranger_t = transports
    rid = f"hostile-{who.split(',')[0]}"
    dst = _pool(seed=None)
    receiver = IpcReceiver(decode_t, prefill_t.address, rid, dst, PROMPT_LEN)
    receiver.start(_unmappable_pool(), [0, 1, 2])
    prefill_t.ignore(f"{rid}:kvdst")
    sender_t, factor = (stranger_t, 1) if who == "stranger" else (prefill_t, 4)
    key, tensors, meta = _stray_group(rid, factor)
    sender_t.send(decode_t.address, key, tensors, meta=meta)
    _until(lambda: receiver.poll(time.monotonic()) is not HandOverState.TRANSFERRING)
    assert receiver.state is HandOverState.FAILED and "refused" in receiver.error
    assert not any(layer.any() for layer in dst), "nothing was scattered into decode's pages"
    assert not receiver.abort(), "no fence: prefill wrote nothing and will write nothing"


def test_a_request_dropped_by_decode_before_the_fallback_is_fenced_only_until_the_kv_went_over_the_wire(
        transports):
    prefill_t, decode_t, _ = transports
    rid, src, dst, released = "dropped-then-fallback", _pool(seed=3), _pool(seed=None), []
    receiver = IpcReceiver(decode_t, prefill_t.address, rid, dst, PROMPT_LEN)
    announce_page_list(prefill_t, decode_t.address, rid)
    receiver.start(_unmappable_pool(), [4, 5, 6])
    assert receiver.abort(), "offered pages are fenced: prefill may be writing into them"
    dropped_at = time.monotonic()
    sender = _sender(prefill_t, decode_t, rid, PoolImports("cpu"), src, [0, 1, 2], released)
    sender.finish(protocol.HandOver(rid, first_token=1, prompt_len=PROMPT_LEN), None)
    _until(lambda: sender.poll() is HandOverState.DONE and receiver.fence_over(dropped_at, timeout_s=60.0))
    assert time.monotonic() - dropped_at < 20, "the fence ended with the record, not the timeout"
    assert released == [[0, 1, 2]]
    assert not any(layer.any() for layer in dst), "KV of a dropped request is never scattered"
