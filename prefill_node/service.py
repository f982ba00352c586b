"""Prefill node: prompt (+ image embeddings) in, KV handed to the decode node.

Queues, in order:
  awaiting_embeddings -> the encoder's `{rid}:emb` (announced, from that encoder only) has not landed
  scheduler (waiting -> running) -> chunked, batched prefill across requests
  transferring -> the request's hand-over sender (`epd.node.handover.WireSender` over UCX, or
                  `epd.node.ipc_handover.IpcSender` through CUDA IPC on one host), made when its
                  last chunk is scheduled: the forward's layer hook streams the KV (wire) or queues
                  the write into decode's pages (IPC; sent over the wire instead when decode's pool
                  cannot be mapped or written); then the `HandOver` record follows.
The sender owns the request's pages from then on and gives them back exactly once: hand-over
done, failed, or aborted (an IPC sender dropped before its write tells decode it may free the pages
it offered). A hand-over that fails (decode node dead) marks the room failed and reports the
error to the router. A request id already held here is refused without touching the one that has it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from epd import protocol
from epd.engine.engine_core import EngineCore
from epd.engine.inputs import ImageInput, InputError, build_processed
from epd.engine.request import Request
from epd.engine.role_engines import FirstTokens, PrefillEngine
from epd.engine.sampling import SamplingParams
from epd.models.family import ImageLayout
from epd.node.embedding_arena import EmbeddingArena
from epd.node.handover import CrossRowsKV, HandOverState, WireSender
from epd.node.ipc_handover import IpcSender, announce_page_list
from epd.node.rank_handover import RankWireSender, rank_peers
from epd.node.runtime import pool_status
from epd.node.throughput import Throughput
from kv_transfer.cuda_ipc import PoolImports
from kv_transfer.kv_codec import kind_groups
from kv_transfer.layout import KVLayout
from kv_transfer.redis_util import RedisWatch
from kv_transfer.registry import NodeRegistry
from kv_transfer.rooms import RoomStore

log = logging.getLogger(__name__)
EMBEDDING_BYTES = 8   # per value, at most (float64): the bound an encoder's embeddings are announced with


@dataclasses.dataclass
class Pending:
    identity: bytes
    msg: protocol.PrefillRequest
    arrived: float
    req: Request | None = None
    started: float = 0.0
    sent_at: float = 0.0
    embeddings_at: float = 0.0   # when the loop took the encoder's embeddings (arrived, for text-only requests)
    embeddings_landed: float = 0.0   # when they landed (on the transport's thread)
    embeddings_in_arena: bool = False   # the encoder wrote them into this node's arena (CUDA IPC)
    sender: WireSender | IpcSender | None = None

    def waits(self) -> dict[str, float]:
        """ms waiting for the encoder's embeddings, then for the scheduler; when each began."""
        return {"embeddings_wait_ms": (self.embeddings_at - self.arrived) * 1e3,
                "queue_ms": (self.started - self.embeddings_at) * 1e3,
                "prefill_received_at": protocol.wall_time(self.arrived),
                "embeddings_landed_at": protocol.wall_time(self.embeddings_landed or self.embeddings_at),
                "embeddings_taken_at": protocol.wall_time(self.embeddings_at),
                "prefill_started_at": protocol.wall_time(self.started),
                "embeddings_through_ipc": float(self.embeddings_in_arena)}


class PrefillService:
    def __init__(self, core: EngineCore, layout: KVLayout, group_size: int, kv_timeout_s: float = 60.0) -> None:
        self.core = core
        self.engine = PrefillEngine(core)
        self.layout = layout
        self.kv_timeout_s = kv_timeout_s              # the longest a hand-over may hold its pages
        self.ipc_pools = PoolImports(core.device) if core.device.type == "cuda" else None
        self._last_pool_sweep = 0.0
        chunks = self.engine.token_layer_chunks   # cross-attention layers' image rows go on their own
        self.groups = kind_groups(chunks, group_size or len(chunks))
        self.awaiting: dict[str, Pending] = {}
        self.active: dict[str, Pending] = {}        # in the scheduler
        self.transferring: dict[str, Pending] = {}
        self.runtime: Any = None                    # NodeRuntime, set by main
        self.rooms: RoomStore | None = None
        self.refused = 0                            # requests refused on arrival (duplicate id)
        self.prompt_tokens = 0                      # prompt tokens this node computed (the periodic stats line)
        self.throughput = Throughput()              # prompt tokens per busy second (NodeStatus.rates)
        self.arena: EmbeddingArena | None = None    # encoders write embeddings here (CUDA IPC), set by main
        self.embeddings_in_arena = 0                # requests whose embeddings came that way
        self.redis_watch = RedisWatch("prefill node")

    # ---- control messages ---------------------------------------------------------------
    def handle(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, protocol.PrefillRequest):
            self._arrive(identity, msg)
        elif isinstance(msg, protocol.Abort):
            self._abort(msg.rid)

    def _arrive(self, identity: bytes, msg: protocol.PrefillRequest) -> None:
        p = Pending(identity, msg, time.monotonic())
        if msg.rid in self.awaiting or msg.rid in self.active or msg.rid in self.transferring:
            self.refused += 1   # the request that has this id goes on untouched (a reply would reach it too)
            log.warning("refused a second request with id %r", msg.rid)
            return
        transport = self.runtime.transport
        transport.connect(msg.decode_ucx)  # overlap connection setup with the prefill
        if msg.kv_ipc:
            announce_page_list(transport, msg.decode_ucx, msg.rid)
        if not msg.images:
            p.embeddings_at = p.arrived
            self._start(p, [])
            return
        tokens = sum(self._embedding_rows(msg))
        transport.expect(f"{msg.rid}:emb", peer=msg.encoder_ucx or None,
                         max_bytes=tokens * self.core.model_config.text.hidden_size * EMBEDDING_BYTES)
        self.awaiting[msg.rid] = p
        if msg.emb_ipc and self.arena is not None and msg.encoder_ucx:
            self._offer_slot(msg, tokens)

    def _embedding_rows(self, msg: protocol.PrefillRequest) -> list[int]:
        """Rows of the encoder's output for each of the request's images."""
        return [self.core.model_config.family.wire_embedding_rows(values) for values in msg.images]

    def _offer_slot(self, msg: protocol.PrefillRequest, tokens: int) -> None:
        """CUDA IPC: rows of this node's arena for the encoder to write the embeddings into (none free:
        the encoder sends them over the wire, as it does when the slot comes late)."""
        first_row = self.arena.reserve(msg.rid, tokens)
        if first_row is not None:
            self.runtime.transport.send(msg.encoder_ucx, f"{msg.rid}:embslot", [], meta=protocol.data_meta(
                protocol.EmbeddingSlot(msg.rid, self.arena.desc, first_row, tokens)))

    def _abort(self, rid: str) -> None:
        transport = self.runtime.transport
        fenced = self.arena is not None and rid in self.arena.held and rid in self.awaiting
        if fenced:   # the encoder may still write into the rows: they wait for its message
            self.arena.fence(rid)
        for key in ([] if fenced else [f"{rid}:emb"]) + [f"{rid}:kvdst"]:   # may still come: freed as they land
            transport.ignore(key)
        held = self.awaiting.pop(rid, None)
        p = self.active.pop(rid, None)
        if p is not None:
            self.engine.abort(rid)     # frees the request's pages
            if p.sender is not None:   # made for a forward that then failed: it owns no pages yet
                p.sender.disown()
                p.sender.abort()
        sending = self.transferring.pop(rid, None)
        if sending is not None:
            sending.sender.abort()
        p = p or held
        if p is not None and p.sender is None:
            self._release_decode_pages(p)

    def _release_decode_pages(self, p: Pending) -> None:
        """CUDA IPC: nothing was written into decode's pages, and nothing will be: it may free them."""
        if p.msg.kv_ipc:
            self.runtime.transport.send(p.msg.decode_ucx, f"{p.msg.rid}:kvrelease", [],
                                        meta=protocol.data_meta(protocol.Release(p.msg.rid)))

    def _start(self, p: Pending, embeddings: list[torch.Tensor]) -> None:
        msg = p.msg
        try:
            family = self.core.model_config.family
            layouts = [ImageLayout.from_wire(values) for values in msg.images]
            for layout in layouts:
                family.check_layout(layout)
            hashes = msg.image_hashes or [""] * len(layouts)
            images = [ImageInput(layout, embeddings=e, content_hash=h or None)
                      for layout, e, h in zip(layouts, embeddings, hashes, strict=True)]
            inp = build_processed(self.core.model_config, msg.input_ids, images)
            params = dataclasses.replace(SamplingParams.from_dict(msg.params), max_new_tokens=1)
            p.req = self.core.new_request(inp, params, rid=msg.rid)
            self.engine.add(p.req)
        except (InputError, ValueError) as e:
            self._report(p, "prefill", ok=False, error=str(e))
            return
        self.active[msg.rid] = p

    # ---- the loop ---------------------------------------------------------------------------
    def tick(self) -> bool:
        self._poll_embeddings()
        stepped = self._step()
        self._poll_transfers()
        self._unmap_dead_pools()
        return stepped   # waiting for embeddings or sends: the loop sleeps until the transport wakes it

    def counters(self) -> dict[str, float]:
        return {"prompt tokens": self.prompt_tokens, "embeddings through CUDA IPC": self.embeddings_in_arena}

    def load(self) -> float:
        return float(len(self.awaiting) + len(self.active))

    def held(self) -> int:
        """Requests the node still owes work or pages (a draining node exits at 0)."""
        return len(self.awaiting) + len(self.active) + len(self.transferring)

    def _poll_embeddings(self) -> None:
        for rid, p in list(self.awaiting.items()):
            try:
                msg = self.runtime.transport.poll(f"{rid}:emb")
                if msg is None:
                    continue
                tensors = self._embeddings(rid, p, msg)
            except Exception as e:  # noqa: BLE001 - transfer failures fail the request
                del self.awaiting[rid]
                if self.arena is not None:
                    self.arena.release(rid)   # the encoder's message failed: it writes no more
                self._report(p, "encode", ok=False,
                             error=f"embeddings from encoder node {p.msg.encoder_node} failed: {e}")
                continue
            del self.awaiting[rid]
            p.embeddings_at, p.embeddings_landed = time.monotonic(), msg.landed_at
            self._start(p, tensors)
        self._poll_fenced()

    def _embeddings(self, rid: str, p: Pending, msg: Any) -> list[torch.Tensor]:
        """The encoder's embeddings for `rid`: from this node's arena (CUDA IPC) or the message."""
        emb = protocol.read_data_meta(msg.meta, protocol.Embeddings, rid)
        offered = self.arena is not None and rid in self.arena.held
        if emb.layouts != p.msg.images or len(msg.tensors) != (0 if emb.in_arena else len(p.msg.images)) \
                or (emb.in_arena and not offered):
            raise protocol.ProtocolError("the encoder's image layouts do not match the router's")
        if emb.in_arena:
            self.embeddings_in_arena += 1
            p.embeddings_in_arena = True
            return self.arena.take(rid, self._embedding_rows(p.msg))
        if offered:
            self.arena.release(rid)
        return [t.to(self.core.device, self.core.dtype) for t in msg.tensors]

    def _poll_fenced(self) -> None:
        """Rows of dropped requests are free once the encoder's message is in (or the fence times out)."""
        if self.arena is None or not self.arena.fenced:
            return
        for rid in list(self.arena.fenced):
            try:
                landed = self.runtime.transport.poll(f"{rid}:emb") is not None
            except Exception:  # noqa: BLE001 - the encoder's message failed: it writes no more
                landed = True
            if landed:
                self.arena.release(rid)
        for rid in self.arena.expire_fences():
            self.runtime.transport.ignore(f"{rid}:emb")

    def _step(self) -> bool:
        now = time.monotonic()

        def started(req: Request) -> None:
            p = self.active[req.rid]
            p.started = p.started or now

        queued = self.engine.queued_prompt_tokens
        first = self.engine.step(started, self._hook)
        if first is not None:
            self._first_tokens(first)
            self.throughput.add(queued - self.engine.queued_prompt_tokens, time.monotonic() - now)
        return first is not None

    def _hook(self, finishing: list[Request]):
        """The forward's layer hook: each finishing request's sender sees each layer's KV land."""
        senders = [self._sender(self.active[req.rid]) for req in finishing]

        def after_layer(i: int) -> None:
            for sender in senders:
                sender.on_layer(i)
        return after_layer

    def _sender(self, p: Pending) -> WireSender | IpcSender:
        req, msg, engine = p.req, p.msg, self.engine
        if msg.kv_ipc:
            p.sender = IpcSender(self.runtime.transport, msg.decode_ucx, msg.rid, self.ipc_pools, engine.ipc_tensors,
                                 req.pages, engine.pages_for(req.prompt_len), engine.release, self.kv_timeout_s,
                                 engine.num_layers - 1, lambda pages, cross, release: self._wire_sender(
                                     p, pages, cross, release, fallback=True),
                                 cross_pages=req.cross_pages, cross_rows=req.inp.num_cross_rows)
        else:
            p.sender = self._wire_sender(p, req.pages, [], engine.release)
        return p.sender

    def _wire_sender(self, p: Pending, pages: list[int], cross_pages: list[int], release,
                     fallback: bool = False) -> WireSender:
        """The wire hand-over of `p` (`fallback`: of a CUDA IPC one, which decode announced as one
        group of the token layers' whole prompt)."""
        engine = self.engine
        cross = CrossRowsKV(engine.cross_layers, p.req.inp.num_cross_rows, cross_pages)
        groups = [range(len(engine.token_layers))] if fallback else self.groups
        layers = engine.token_layers
        if not fallback and rank_peers(layers, p.msg.decode_ucx_ranks):   # equal TP: each rank its own heads
            return RankWireSender(self.runtime.transport, p.msg.decode_ucx, p.msg.rid, layers, groups, pages,
                                  p.req.prompt_len, release, self.kv_timeout_s, peers=p.msg.decode_ucx_ranks,
                                  cross=cross, chunks=engine.token_layer_chunks)
        return WireSender(self.runtime.transport, p.msg.decode_ucx, p.msg.rid, layers, groups, pages,
                          p.req.prompt_len, release, self.kv_timeout_s, layer_ids=engine.token_layer_ids,
                          cross=cross, chunks=() if fallback else engine.token_layer_chunks)

    def _first_tokens(self, first: FirstTokens) -> None:
        result = first.sampled
        for i, (req, pages, cross) in enumerate(zip(first.requests, first.pages, first.cross_pages, strict=True)):
            p = self.active.pop(req.rid)
            self.prompt_tokens += req.prompt_len - req.cached_tokens   # computed here, not from the cache
            p.sender.pages = pages    # the sender owns them now (the same pages the forward wrote)
            if cross:                 # image rows, which go with the KV
                p.sender.hold_cross_pages(cross)
            now = time.monotonic()
            record = protocol.HandOver(
                req.rid, first_token=result.token_ids[i],
                logprob=result.logprobs[i] if result.logprobs else None,
                top_logprobs=[list(x) for x in result.top_logprobs[i]] if result.top_logprobs else None,
                prompt_len=req.prompt_len, cached_tokens=req.cached_tokens,
                decode_state=req.inp.decode_state.to_wire(), layout=self.layout.to_dict(),
                timings={**p.waits(), "prefill_ms": (now - p.started) * 1e3,
                         "first_token_sampled_at": protocol.wall_time(now)})
            # the decode node continues the same random stream
            state = req.generator.get_state().to("cpu") if req.generator is not None else None
            p.sender.finish(record, state)
            p.sent_at = time.monotonic()
            self.transferring[req.rid] = p

    def _unmap_dead_pools(self, every_s: float = 5.0) -> None:
        """Every few seconds: unmap the pools of decode nodes that left the registry."""
        now = time.monotonic()
        if not self.ipc_pools or now - self._last_pool_sweep < every_s:
            return
        self._last_pool_sweep = now
        nodes = self.redis_watch.call(NodeRegistry(self.runtime.redis, self.runtime.secret).list_nodes, "decode")
        if nodes is None:   # Redis is down: nobody is known to be gone
            return
        live = {n.node_id for n in nodes}
        for pool_id in self.ipc_pools.drop_orphans(live):
            log.info("unmapped the KV pool %s of a decode node that is gone", pool_id)

    def _poll_transfers(self) -> None:
        for rid, p in list(self.transferring.items()):
            state = p.sender.poll()
            if state in (HandOverState.WAITING_FOR_PAGES, HandOverState.TRANSFERRING):
                continue
            del self.transferring[rid]
            if state is HandOverState.FAILED:
                error = f"KV transfer to decode node {p.msg.decode_node} failed: {p.sender.error}"
                if self.rooms is not None:
                    self.redis_watch.call(self.rooms.mark_failed, rid, error, "transfer", self.runtime.node_id)
                self._report(p, "transfer", ok=False, error=error)
                continue
            seconds = time.monotonic() - p.sent_at
            nbytes = p.sender.nbytes or self.engine.bytes_per_page * (   # written through CUDA IPC: whole pages
                self.engine.pages_for(p.req.prompt_len) + self.engine.pages_for_rows(p.req.inp.num_cross_rows))
            log.info("KV of %s: %d bytes handed to decode node %s %s, done %.2f ms after the first token", rid,
                     nbytes, p.msg.decode_node, p.sender.via, seconds * 1e3)
            self._report(p, "prefill", ok=True, timings={
                **p.waits(), "prefill_ms": (p.sent_at - p.started) * 1e3,
                "transfer_tail_ms": seconds * 1e3}, info={"kv_bytes": nbytes})

    def _report(self, p: Pending, stage: str, ok: bool, error: str = "", timings: dict | None = None,
                info: dict | None = None) -> None:
        if not ok and stage != "transfer":   # failed before any KV was written
            self._release_decode_pages(p)
        self.runtime.send(p.identity, protocol.StageReport(p.msg.rid, stage, self.runtime.node_id, ok, error,
                                                           timings or {}, info or {}))

    def check_integrity(self) -> None:
        self.engine.check_integrity([pg for p in self.transferring.values() for pg in p.sender.held_pages()])

    def status(self) -> dict[str, Any]:
        queued = self.engine.queued_prompt_tokens + sum(len(p.msg.input_ids) for p in self.awaiting.values())
        queues = {"awaiting_embeddings": len(self.awaiting), "prefilling": len(self.active),
                  "scheduler_waiting": self.engine.num_waiting, "transferring": len(self.transferring),
                  "queued_prompt_tokens": queued}
        return {**pool_status(self.engine, self.check_integrity, queues),
                "rates": {"prompt_tokens": self.throughput.rate}}

    def shutdown(self) -> None:
        for rid in list(self.active) + list(self.transferring) + list(self.awaiting):
            self._abort(rid)
