"""Decode node: reserve pages, receive the prompt's KV into them, then decode in the batch.

Queues, in order:
  awaiting_pages -> announced (DecodeRequest) but the pool cannot yet hold prompt + max tokens
  awaiting_kv    -> pages reserved; over UCX, KV groups `{rid}:kv:{g}` are scattered into them
                    as they land (page sizes may differ from the prefill node's); through CUDA
                    IPC (same host), the prompt's page ids go to the prefill node
                    (`{rid}:kvdst`), which writes the KV into them itself; then `{rid}:meta`
                    (first token, decode state, sampler state) completes the hand-over
  running        -> in the continuous batch (EngineCore.step); tokens stream to the router
  fenced         -> (CUDA IPC only) pages of a request dropped after the prefill node was told to
                    write them: held until it says it wrote them (`{rid}:meta`) or never will
                    (`{rid}:kvrelease`), or `kv_timeout` passes, so no late write lands in
                    pages that another request now owns
Admission reserves every page the request can need, so decoding never preempts. A request
waiting for KV fails (pages freed, error to the router) when the transfer fails, the room is
marked failed, or `kv_timeout` passes.
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
from epd.node.runtime import pool_status
from kv_transfer.cuda_ipc import export_pool
from kv_transfer.kv_codec import scatter_kv
from kv_transfer.layout import KVLayout, LayoutMismatchError
from kv_transfer.rooms import RoomState, RoomStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Incoming:
    identity: bytes
    msg: protocol.DecodeRequest
    req: Request
    arrived: float
    next_group: int = 0
    meta: dict | None = None
    landed_at: float = 0.0     # when the hand-over completed here (admitted to the batch)
    meta_landed_at: float = 0.0   # when `{rid}:meta` landed (on the transport's thread)
    first_kv_at: float = 0.0   # when the first layer group was taken from the transport
    pages_offered: bool = False   # CUDA IPC: the prefill node may be writing into our pages


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
        self.fenced: dict[str, tuple[list[int], float]] = {}   # rid -> (pages, since)
        self._pool_desc: dict | None = None   # our pool as CUDA IPC handles, made on first use

    # ---- control messages ---------------------------------------------------------------
    def handle(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, protocol.DecodeRequest):
            self._announce(identity, msg)
        elif isinstance(msg, protocol.Abort):
            self._drop(msg.rid)

    def _announce(self, identity: bytes, msg: protocol.DecodeRequest) -> None:
        mismatch = self._layout_problem(msg.prefill_layout_hash)
        try:
            if mismatch:
                raise ValueError(mismatch)
            if msg.kv_ipc and self.core.device.type != "cuda":
                raise ValueError("CUDA IPC hand-over asked of a decode node that is not on a GPU")
            req = self.engine.new_request(msg.input_ids, SamplingParams.from_dict(msg.params), msg.rid)
        except ValueError as e:
            self.runtime.send(identity, protocol.TokenDelta(msg.rid, [], "", finished=True, error=str(e),
                                                            stage="decode", node=self.runtime.node_id))
            return
        self.awaiting_pages[msg.rid] = Incoming(identity, msg, req, time.monotonic())

    def _layout_problem(self, prefill_hash: str) -> str:
        if prefill_hash == self.layout.layout_hash():
            return ""
        raw = self.runtime.redis.get(f"epd:layout:{prefill_hash}")
        if raw is None:
            return f"KV layout mismatch: prefill layout {prefill_hash} is unknown, ours is {self.layout.layout_hash()}"
        try:
            KVLayout.from_dict(json.loads(raw)).check_compatible(self.layout, ours="prefill", theirs="decode")
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
        self._emit(events)
        return bool(events) or self.engine.busy   # waiting for KV: the loop sleeps until the transport wakes it

    def load(self) -> float:
        return float(len(self.running) + len(self.awaiting_kv) + len(self.awaiting_pages))

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
            if inc.msg.kv_ipc:
                self._offer_pages(inc)

    def _offer_pages(self, inc: Incoming) -> None:
        """CUDA IPC: tell the prefill node which of our pages to write the prompt's KV into."""
        if self._pool_desc is None:
            self._pool_desc = export_pool(self.engine.kv_layers, owner=self.runtime.node_id)
        pages = inc.req.pages[:self.engine.pages_for(inc.req.prompt_len)]
        self.runtime.transport.send(inc.msg.prefill_ucx, f"{inc.msg.rid}:kvdst", [],
                                    meta={"pool": self._pool_desc, "pages": pages})
        inc.pages_offered = True

    def _receive(self) -> None:
        transport = self.runtime.transport
        for rid, inc in list(self.awaiting_kv.items()):
            try:
                while (msg := transport.poll(f"{rid}:kv:{inc.next_group}")) is not None:
                    inc.first_kv_at = inc.first_kv_at or time.monotonic()
                    lo, hi = msg.meta["layers"]
                    scatter_kv(msg.tensors[0].to(self.core.device), self.engine.kv_layers[lo:hi], inc.req.pages)
                    inc.next_group += 1
                if inc.meta is None:
                    meta_msg = transport.poll(f"{rid}:meta")
                    if meta_msg is not None:
                        inc.meta = dict(meta_msg.meta, generator_state=meta_msg.tensors[:1])
                        inc.meta_landed_at = meta_msg.landed_at
                        if "error" in inc.meta:
                            raise RuntimeError(inc.meta["error"])
                        if inc.meta.get("ipc_written"):   # prefill wrote the KV into our pages
                            inc.first_kv_at = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a broken transfer fails this request only
                self._fail(self.awaiting_kv.pop(rid), "transfer",
                           f"KV transfer from prefill node {inc.msg.prefill_node} failed: {e}")
                continue
            if inc.meta is not None and inc.next_group == inc.meta["num_groups"]:
                del self.awaiting_kv[rid]
                self._admit(inc)

    def _clear_fences(self) -> None:
        """Free fenced pages once the prefill node wrote them, released them, or kv_timeout passed."""
        transport, now = self.runtime.transport, time.monotonic()
        for rid, (pages, since) in list(self.fenced.items()):
            try:
                done = any([transport.poll(f"{rid}:meta"), transport.poll(f"{rid}:kvrelease")])
            except Exception:  # noqa: BLE001 - the connection to prefill failed: it writes no more
                done = True
            if done or now - since > self.kv_timeout:
                for key in (f"{rid}:meta", f"{rid}:kvrelease"):   # the other one may still come
                    transport.ignore(key)
                self.engine.release(pages)
                del self.fenced[rid]

    def _admit(self, inc: Incoming) -> None:
        req, meta = inc.req, inc.meta
        assert meta is not None
        if meta["prompt_len"] != req.prompt_len:
            self._fail(inc, "transfer", f"prefill sent {meta['prompt_len']} tokens of KV, expected {req.prompt_len}")
            return
        inc.landed_at = time.monotonic()
        top = [tuple(x) for x in meta["top_logprobs"]] if meta.get("top_logprobs") else None
        generator = meta["generator_state"][0] if meta["generator_state"] else None
        event = self.engine.admit(req, int(meta["first_token"]), meta.get("logprob"), top,
                                  DecodeState.from_wire(meta["decode_state"]), generator)
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
        for rid, room in self.rooms.get_many(list(self.awaiting_kv)).items():
            if room is not None and room.state is RoomState.FAILED:
                f = room.failure
                self._fail(self.awaiting_kv.pop(rid), f.stage, f"{f.reason} (node {f.node})")

    # ---- output and teardown ------------------------------------------------------------
    def _emit(self, events: list[TokenEvent]) -> None:
        for ev in events:
            inc = self.running.get(ev.rid)
            if inc is None:
                continue
            req = inc.req
            timings = {}
            if ev.finished:
                del self.running[ev.rid]
                timings = {**(inc.meta or {}).get("timings", {}),   # the prefill node's queue/prefill times
                           "decode_received_at": protocol.wall_time(inc.arrived),
                           "kv_landed_at": protocol.wall_time(inc.landed_at),
                           "kv_meta_landed_at": protocol.wall_time(inc.meta_landed_at or inc.landed_at),
                           "kv_wait_ms": (inc.landed_at - inc.arrived) * 1e3,
                           "transfer_ms": (inc.landed_at - (inc.first_kv_at or inc.landed_at)) * 1e3,
                           "decode_ms": (time.monotonic() - inc.landed_at) * 1e3}
            self.runtime.send(inc.identity, protocol.TokenDelta(
                ev.rid, [ev.token_id], ev.text,
                logprobs=[ev.logprob] if ev.logprob is not None else None,
                top_logprobs=[[list(x) for x in ev.top_logprobs]] if ev.top_logprobs else None,
                finished=ev.finished, finish_reason=ev.finish_reason, prompt_tokens=req.prompt_len,
                completion_tokens=ev.completion_tokens, cached_tokens=(inc.meta or {}).get("cached_tokens", 0),
                timings=timings))

    def _fail(self, inc: Incoming, stage: str, error: str) -> None:
        log.warning("request %s failed at %s: %s", inc.msg.rid, stage, error)
        self._release(inc)
        self.runtime.send(inc.identity, protocol.TokenDelta(inc.msg.rid, [], "", finished=True, error=error,
                                                            stage=stage, node=self.runtime.node_id))

    def _release(self, inc: Incoming) -> None:
        rid = inc.msg.rid
        num_layers = self.core.model_config.text.num_layers  # an upper bound on the group count
        fencing = rid not in self.running and inc.pages_offered and inc.meta is None
        late = [] if fencing else [f"{rid}:meta"] + ([f"{rid}:kvrelease"] if inc.msg.kv_ipc else [])
        for key in late + [f"{rid}:kv:{g}" for g in range(inc.next_group, num_layers)]:
            self.runtime.transport.ignore(key)   # what prefill may still send is freed as it lands
        if rid in self.running:
            del self.running[rid]
            self.engine.abort(rid)
        elif inc.req.pages and inc.pages_offered and inc.meta is None:
            self.fenced[rid] = (inc.req.pages, time.monotonic())
            inc.req.pages = []
        elif inc.req.pages:
            self.engine.release(inc.req.pages)
            inc.req.pages = []

    def _drop(self, rid: str) -> None:
        """Abort: free whatever the request holds, wherever it is (no reply is owed)."""
        inc = self.awaiting_pages.pop(rid, None) or self.awaiting_kv.pop(rid, None) or self.running.get(rid)
        if inc is not None:
            self._release(inc)

    def check_integrity(self) -> None:
        held = [pg for inc in self.awaiting_kv.values() for pg in inc.req.pages]
        self.engine.check_integrity(held + [pg for pages, _ in self.fenced.values() for pg in pages])

    def status(self) -> dict[str, Any]:
        queues = {"awaiting_pages": len(self.awaiting_pages), "awaiting_kv": len(self.awaiting_kv),
                  "running": len(self.running), "fenced": len(self.fenced)}
        return pool_status(self.engine, self.check_integrity, queues)

    def shutdown(self) -> None:
        for rid in list(self.awaiting_pages) + list(self.awaiting_kv) + list(self.running):
            self._drop(rid)
