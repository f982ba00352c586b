"""Decode node: reserve pages, receive the prompt's KV into them, then decode in the batch.

Queues, in order:
  awaiting_pages -> announced (DecodeRequest): its hand-over receiver (`epd.node.handover.
                    WireReceiver`, or `epd.node.ipc_handover.IpcReceiver` on one GPU host) has
                    told the transport what the prefill node will send, from it only and no
                    larger than the prompt's KV; the pool cannot yet hold prompt + max tokens
  awaiting_kv    -> pages reserved: the receiver scatters KV groups into them as they land, or
                    (CUDA IPC) has sent their ids to the prefill node, which writes into them (or,
                    when it cannot, sends the KV over the wire: the receiver takes that too);
                    the `HandOver` record (first token, decode state, sampler state) completes it
  running        -> in the continuous batch (DecodeEngine.step); tokens stream to the router
  fenced         -> (CUDA IPC only) pages of a request dropped after the prefill node was told to
                    write them: held until it says it wrote them or never will, or `kv_timeout`
                    passes, so no late write lands in pages that another request now owns
Admission reserves every page the request can need, so decoding never preempts. A request
waiting for KV fails (pages freed, error to the router) when the hand-over fails, the room is
marked failed, or `kv_timeout` passes. A request id already held here is refused without touching
the request that has it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from epd import protocol
from epd.engine.engine_core import EngineCore
from epd.engine.request import Request, TokenEvent
from epd.engine.role_engines import DecodeEngine
from epd.engine.sampling import SamplingParams
from epd.models.family import DecodeState
from epd.node.handover import CrossRowsKV, HandOverState, WireReceiver
from epd.node.ipc_handover import IpcReceiver
from epd.node.rank_handover import RankWireReceiver, rank_peers
from epd.node.runtime import pool_status, token_delta
from kv_transfer.cuda_ipc import export_pool
from kv_transfer.layout import KVLayout, LayoutMismatchError
from kv_transfer.redis_util import RedisWatch
from kv_transfer.rooms import RoomState, RoomStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Incoming:
    identity: bytes
    msg: protocol.DecodeRequest
    req: Request
    arrived: float
    receiver: WireReceiver | IpcReceiver
    landed_at: float = 0.0     # when the hand-over completed here (admitted to the batch)

    @property
    def record(self) -> protocol.HandOver | None:
        return self.receiver.record


class DecodeService:
    def __init__(self, core: EngineCore, layout: KVLayout, kv_timeout: float) -> None:
        self.core = core
        self.engine = DecodeEngine(core)
        self.layout = layout
        self.kv_timeout = kv_timeout
        self.awaiting_pages: OrderedDict[str, Incoming] = OrderedDict()
        self.awaiting_kv: dict[str, Incoming] = {}
        self.running: dict[str, Incoming] = {}
        self.runtime: Any = None
        self.rooms: RoomStore | None = None
        self._last_room_check = 0.0
        self.fenced: dict[str, tuple[IpcReceiver, list[int], float]] = {}   # rid -> (receiver, pages, since)
        self._pool_desc: dict | None = None   # our pool as CUDA IPC handles, made on first use
        self.refused = 0                      # requests refused on arrival (duplicate id)
        self.tokens_generated = 0             # tokens this node decoded (the periodic stats line)
        self.redis_watch = RedisWatch("decode node")

    # ---- control messages ---------------------------------------------------------------
    def handle(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, protocol.DecodeRequest):
            self._announce(identity, msg)
        elif isinstance(msg, protocol.Abort):
            self._drop(msg.rid)

    def _announce(self, identity: bytes, msg: protocol.DecodeRequest) -> None:
        if msg.rid in self.awaiting_pages or msg.rid in self.awaiting_kv or msg.rid in self.running \
                or msg.rid in self.fenced:
            self.refused += 1   # the request that has this id goes on untouched (a reply would reach it too)
            log.warning("refused a second request with id %r", msg.rid)
            return
        mismatch = self._layout_problem(msg.prefill_layout_hash)
        try:
            if mismatch:
                raise ValueError(mismatch)
            if msg.kv_ipc and self.core.device.type != "cuda":
                raise ValueError("CUDA IPC hand-over asked of a decode node that is not on a GPU")
            if not msg.prefill_ucx:
                raise ValueError("a decode request must name the prefill node's transport address")
            req = self.engine.new_request(msg.input_ids, SamplingParams.from_dict(msg.params), msg.rid, msg.images)
        except ValueError as e:
            self.runtime.send(identity, protocol.TokenDelta(msg.rid, [], "", finished=True, error=str(e),
                                                            stage="decode", node=self.runtime.node_id))
            return
        transport = self.runtime.transport
        cross = CrossRowsKV(self.engine.cross_layers, req.inp.num_cross_rows)
        if msg.kv_ipc:
            receiver = IpcReceiver(transport, msg.prefill_ucx, msg.rid, self.engine.token_layers, req.prompt_len,
                                   cross=cross)
        elif rank_peers(layers := self.engine.token_layers, msg.prefill_ucx_ranks):   # equal TP: rank by rank
            receiver = RankWireReceiver(transport, msg.prefill_ucx, msg.rid, layers, req.prompt_len,
                                        peers=msg.prefill_ucx_ranks, cross=cross,
                                        chunks=self.engine.token_layer_chunks)
        else:
            receiver = WireReceiver(transport, msg.prefill_ucx, msg.rid, layers, req.prompt_len,
                                    cross=cross, chunks=self.engine.token_layer_chunks)
        self.awaiting_pages[msg.rid] = Incoming(identity, msg, req, time.monotonic(), receiver)

    def _layout_problem(self, prefill_hash: str) -> str:
        if prefill_hash == self.layout.layout_hash():
            return ""
        raw = self.runtime.redis.get(f"epd:layout:{prefill_hash}")
        theirs = KVLayout.from_dict(json.loads(raw)) if raw is not None else None
        if theirs is None or theirs.layout_hash() != prefill_hash:   # the record must be what it is named
            return f"KV layout mismatch: prefill layout {prefill_hash} is unknown, ours is {self.layout.layout_hash()}"
        try:
            theirs.check_compatible(self.layout, ours="prefill", theirs="decode")
        except LayoutMismatchError as e:
            return str(e)
        return ""

    # ---- the loop ---------------------------------------------------------------------------
    def tick(self) -> bool:
        self._reserve()
        self._receive()
        self._watch()
        self._clear_fences()
        events = self.engine.step()
        self.tokens_generated += len(events)
        self._emit(events)
        return bool(events) or self.engine.busy   # waiting for KV: the loop sleeps until the transport wakes it

    def load(self) -> float:
        return float(len(self.running) + len(self.awaiting_kv) + len(self.awaiting_pages))

    def held(self) -> int:
        """Requests the node still owes tokens or pages (a draining node exits at 0)."""
        return len(self.running) + len(self.awaiting_kv) + len(self.awaiting_pages) + len(self.fenced)

    def counters(self) -> dict[str, float]:
        return {"generation tokens": self.tokens_generated}

    def _reserve(self) -> None:
        engine = self.engine
        while self.awaiting_pages:
            inc = next(iter(self.awaiting_pages.values()))
            if not engine.fits(inc.req):
                self._fail(self.awaiting_pages.pop(inc.msg.rid), "decode",
                           f"request needs {inc.req.max_total_tokens} tokens of KV; the pool holds "
                           f"{engine.capacity * engine.page_size}")
                continue
            if not engine.reserve(inc.req):
                return
            del self.awaiting_pages[inc.msg.rid]
            self.awaiting_kv[inc.msg.rid] = inc
            if inc.msg.kv_ipc and self._pool_desc is None:
                self._pool_desc = export_pool(engine.ipc_tensors, owner=self.runtime.node_id)
            prompt_pages = inc.req.pages[:engine.pages_for(inc.req.prompt_len)]
            inc.receiver.start(self._pool_desc, prompt_pages, inc.req.cross_pages)

    def _receive(self) -> None:
        now = time.monotonic()
        for rid, inc in list(self.awaiting_kv.items()):
            state = inc.receiver.poll(now)
            if state is HandOverState.FAILED:
                self._fail(self.awaiting_kv.pop(rid), "transfer",
                           f"KV transfer from prefill node {inc.msg.prefill_node} failed: {inc.receiver.error}")
            elif state is HandOverState.DONE:
                del self.awaiting_kv[rid]
                self._admit(inc)

    def _clear_fences(self) -> None:
        """Free fenced pages once the prefill node wrote them, released them, or kv_timeout passed."""
        for rid, (receiver, pages, since) in list(self.fenced.items()):
            if receiver.fence_over(since, self.kv_timeout):
                self.engine.release(pages)
                del self.fenced[rid]

    def _admit(self, inc: Incoming) -> None:
        req, record = inc.req, inc.record
        assert record is not None
        inc.landed_at = time.monotonic()
        top = [tuple(x) for x in record.top_logprobs] if record.top_logprobs else None
        try:
            state = DecodeState.from_wire(record.decode_state)
        except ValueError as e:
            self._fail(inc, "transfer", f"prefill node {inc.msg.prefill_node} sent a bad decode state: {e}")
            return
        event = self.engine.admit(req, record.first_token, record.logprob, top, state, inc.receiver.generator_state)
        self.running[req.rid] = inc
        self._emit([event])

    def _watch(self) -> None:
        """Fail requests whose KV will not come: timeout, or a failure recorded in their room."""
        now = time.monotonic()
        check_rooms = self.rooms is not None and now - self._last_room_check > 0.5
        if check_rooms:
            self._last_room_check = now
        for rid, inc in list(self.awaiting_kv.items()):
            if now - inc.arrived > self.kv_timeout:
                self._fail(self.awaiting_kv.pop(rid), "transfer",
                           f"no KV from prefill node {inc.msg.prefill_node} within {self.kv_timeout:.0f}s")
        if not check_rooms or not self.awaiting_kv:
            return
        # one Redis round trip for all of them: this loop also runs the decode batch
        rooms = self.redis_watch.call(self.rooms.get_many, list(self.awaiting_kv), default={})
        for rid, room in rooms.items():
            if room is not None and room.state is RoomState.FAILED:
                f = room.failure
                self._fail(self.awaiting_kv.pop(rid), f.stage, f"{f.reason} (node {f.node})")

    # ---- output and teardown ------------------------------------------------------------
    def _emit(self, events: list[TokenEvent]) -> None:
        for ev in events:
            inc = self.running.get(ev.rid)
            if inc is None:
                continue
            req, record, receiver = inc.req, inc.record, inc.receiver
            timings = {}
            if ev.finished:
                del self.running[ev.rid]
                timings = {**record.timings,   # the prefill node's queue/prefill times
                           "decode_received_at": protocol.wall_time(inc.arrived),
                           "kv_landed_at": protocol.wall_time(inc.landed_at),
                           "kv_meta_landed_at": protocol.wall_time(receiver.record_landed_at or inc.landed_at),
                           "kv_wait_ms": (inc.landed_at - inc.arrived) * 1e3,
                           "transfer_ms": (inc.landed_at - (receiver.first_kv_at or inc.landed_at)) * 1e3,
                           "decode_ms": (time.monotonic() - inc.landed_at) * 1e3}
            self.runtime.send(inc.identity, token_delta(ev, req.prompt_len, record.cached_tokens, timings))

    def _fail(self, inc: Incoming, stage: str, error: str) -> None:
        log.warning("request %s failed at %s: %s", inc.msg.rid, stage, error)
        self._release(inc)
        self.runtime.send(inc.identity, protocol.TokenDelta(inc.msg.rid, [], "", finished=True, error=error,
                                                            stage=stage, node=self.runtime.node_id))

    def _release(self, inc: Incoming) -> None:
        rid = inc.msg.rid
        if rid in self.running:
            del self.running[rid]
            self.engine.abort(rid)
            return
        fence = inc.receiver.abort()   # what prefill may still send is freed as it lands
        held = inc.req.pages + inc.req.cross_pages
        if held and fence:
            self.fenced[rid] = (inc.receiver, held, time.monotonic())
        elif held:
            self.engine.release(held)
        inc.req.pages, inc.req.cross_pages = [], []

    def _drop(self, rid: str) -> None:
        """Abort: free whatever the request holds, wherever it is (no reply is owed)."""
        inc = self.awaiting_pages.pop(rid, None) or self.awaiting_kv.pop(rid, None) or self.running.get(rid)
        if inc is not None:
            self._release(inc)

    def check_integrity(self) -> None:
        held = [pg for inc in self.awaiting_kv.values() for pg in inc.req.pages + inc.req.cross_pages]
        self.engine.check_integrity(held + [pg for _, pages, _ in self.fenced.values() for pg in pages])

    def status(self) -> dict[str, Any]:
        queues = {"awaiting_pages": len(self.awaiting_pages), "awaiting_kv": len(self.awaiting_kv),
                  "running": len(self.running), "fenced": len(self.fenced)}
        return pool_status(self.engine, self.check_integrity, queues)

    def shutdown(self) -> None:
        for rid in list(self.awaiting_pages) + list(self.awaiting_kv) + list(self.running):
            self._drop(rid)
