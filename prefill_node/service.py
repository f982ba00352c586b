"""Prefill node: prompt (+ image embeddings) in, KV handed to the decode node.

Queues, in order:
  awaiting_embeddings -> the encoder's `{rid}:emb` message has not landed yet
  scheduler (waiting -> running) -> chunked, batched prefill across requests
  transferring -> over UCX: the last chunk's forward sends the KV layer group by layer group
                  (`{rid}:kv:{g}`, token-major wire layout), then the first token and the decode
                  state (`{rid}:meta`); pages are freed when every send is acknowledged.
                  Through CUDA IPC (same host): once the decode node's page list (`{rid}:kvdst`)
                  is in, the KV is written straight into its pages (queued on the GPU right behind
                  the last layer when the list came before the forward, so it is done when the
                  first token is read back; else written then), our pages are freed, and
                  `{rid}:meta` says the KV is in place.
Pages are freed at once on failure or abort. An abort before the KV was written sends
`{rid}:kvrelease`, so the decode node knows nothing more will be written into its pages.
A send that fails (decode node dead) marks the room failed and reports the error to the router.
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
from epd.node.runtime import pool_status
from kv_transfer.cuda_ipc import PoolImports
from kv_transfer.inbox import SlotState
from kv_transfer.kv_codec import gather_kv, layer_groups
from kv_transfer.layout import KVLayout
from kv_transfer.registry import NodeRegistry
from kv_transfer.rooms import RoomStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Pending:
    identity: bytes
    msg: protocol.PrefillRequest
    arrived: float
    req: Request | None = None
    started: float = 0.0
    pages: list[int] = dataclasses.field(default_factory=list)
    sends: list[Any] = dataclasses.field(default_factory=list)
    sent_at: float = 0.0
    embeddings_at: float = 0.0   # when the loop took the encoder's embeddings (arrived, for text-only requests)
    embeddings_landed: float = 0.0   # when they landed (on the transport's thread)
    handover: tuple[dict, list] | None = None   # CUDA IPC: (meta, tensors) held until the KV is written
    page_list: Any = None        # CUDA IPC: decode's `{rid}:kvdst` message, once taken
    write_queued: bool = False   # CUDA IPC: the write was queued behind the last layer

    def waits(self) -> dict[str, float]:
        """ms waiting for the encoder's embeddings, then for the scheduler; when each began."""
        return {"embeddings_wait_ms": (self.embeddings_at - self.arrived) * 1e3,
                "queue_ms": (self.started - self.embeddings_at) * 1e3,
                "prefill_received_at": protocol.wall_time(self.arrived),
                "embeddings_landed_at": protocol.wall_time(self.embeddings_landed or self.embeddings_at),
                "embeddings_taken_at": protocol.wall_time(self.embeddings_at),
                "prefill_started_at": protocol.wall_time(self.started)}


class PrefillService:
    def __init__(self, core: EngineCore, layout: KVLayout, group_size: int, kv_timeout_s: float = 60.0) -> None:
        self.core = core
        self.engine = PrefillEngine(core)
        self.layout = layout
        self.kv_timeout_s = kv_timeout_s              # CUDA IPC: how long to wait for decode's page list
        self.ipc_pools = PoolImports(core.device) if core.device.type == "cuda" else None
        self._last_pool_sweep = 0.0
        num_layers = core.model_config.text.num_layers
        self.groups = layer_groups(num_layers, group_size or num_layers)
        self.awaiting: dict[str, Pending] = {}
        self.active: dict[str, Pending] = {}        # in the scheduler
        self.transferring: dict[str, Pending] = {}
        self.runtime: Any = None                    # NodeRuntime, set by main
        self.rooms: RoomStore | None = None

    # ---- control messages ---------------------------------------------------------------
    def handle(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, protocol.PrefillRequest):
            p = Pending(identity, msg, time.monotonic())
            self.runtime.transport.connect(msg.decode_ucx)  # overlap connection setup with the prefill
            if msg.images:
                self.awaiting[msg.rid] = p
            else:
                p.embeddings_at = p.arrived
                self._start(p, [])
        elif isinstance(msg, protocol.Abort):
            self._abort(msg.rid)

    def _abort(self, rid: str) -> None:
        transport = self.runtime.transport
        for key in (f"{rid}:emb", f"{rid}:kvdst"):   # may still come: freed as they land
            transport.ignore(key)
        held = self.awaiting.pop(rid, None)
        p = self.active.pop(rid, None)
        if p is not None:
            self.engine.abort(rid)
        sending = self.transferring.pop(rid, None)
        if sending is not None:
            self.engine.release(sending.pages)
        p = p or held or sending
        if p is not None and (sending is None or sending.handover is not None):
            self._release_decode_pages(p)

    def _release_decode_pages(self, p: Pending) -> None:
        """CUDA IPC: nothing was written into decode's pages, and nothing will be: it may free them."""
        if p.msg.kv_ipc:
            self.runtime.transport.send(p.msg.decode_ucx, f"{p.msg.rid}:kvrelease", [])

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

    def load(self) -> float:
        return float(len(self.awaiting) + len(self.active))

    def _poll_embeddings(self) -> None:
        for rid, p in list(self.awaiting.items()):
            try:
                msg = self.runtime.transport.poll(f"{rid}:emb")
            except Exception as e:  # noqa: BLE001 - transfer failures fail the request
                del self.awaiting[rid]
                self._report(p, "encode", ok=False, error=f"embeddings from the encoder failed: {e}")
                continue
            if msg is not None:
                del self.awaiting[rid]
                if msg.meta.get("layouts") != p.msg.images:
                    self._report(p, "encode", ok=False, error="the encoder's image layouts do not match the router's")
                    continue
                dtype, device = self.core.dtype, self.core.device
                p.embeddings_at, p.embeddings_landed = time.monotonic(), msg.landed_at
                self._start(p, [t.to(device, dtype) for t in msg.tensors])

    def _step(self) -> bool:
        now = time.monotonic()

        def started(req: Request) -> None:
            p = self.active[req.rid]
            p.started = p.started or now

        first = self.engine.step(started, self._streamer)
        if first is not None:
            self._first_tokens(first)
        return first is not None

    def _streamer(self, requests: list[Request]):
        """after_layer hook: when a layer group completes, send it for every finishing request (UCX);
        after the last layer, queue the CUDA IPC write of requests whose page list is in."""
        finishing = [self.active[req.rid] for req in requests]
        for p in finishing:
            key = f"{p.msg.rid}:kvdst"
            if p.msg.kv_ipc and self.runtime.transport.status(key) is SlotState.DONE:
                p.page_list = self.runtime.transport.poll(key)
        last_layer = {g[-1]: gi for gi, g in enumerate(self.groups)}
        layers = self.engine.kv_layers

        def after_layer(i: int) -> None:
            gi = last_layer.get(i)
            if gi is None or not finishing:
                return
            group = self.groups[gi]
            for p in finishing:
                if p.msg.kv_ipc:
                    if i == len(layers) - 1 and p.page_list is not None:
                        p.write_queued = self._queue_write(p)
                    continue
                req = p.req
                wire = gather_kv([layers[j] for j in group], req.pages, req.prompt_len)
                p.sends.append(self.runtime.transport.send(
                    p.msg.decode_ucx, f"{req.rid}:kv:{gi}", [wire],
                    meta={"group": gi, "layers": [group.start, group.stop]}))
        return after_layer

    def _first_tokens(self, first: FirstTokens) -> None:
        result = first.sampled
        for i, (req, pages) in enumerate(zip(first.requests, first.pages, strict=True)):
            p = self.active[req.rid]
            now = time.monotonic()
            meta = {"first_token": result.token_ids[i], "decode_state": req.inp.decode_state.to_wire(),
                    "timings": {**p.waits(), "prefill_ms": (now - p.started) * 1e3,
                                "first_token_sampled_at": protocol.wall_time(now)},
                    "prompt_len": req.prompt_len, "cached_tokens": req.cached_tokens, "num_groups": len(self.groups),
                    "layout": self.layout.to_dict(),
                    "logprob": result.logprobs[i] if result.logprobs else None,
                    "top_logprobs": [list(x) for x in result.top_logprobs[i]] if result.top_logprobs else None}
            tensors = []
            if req.generator is not None:  # the decode node continues the same random stream
                tensors.append(req.generator.get_state().to("cpu"))
            if p.msg.kv_ipc:   # written into decode's pages once its page list is in (_poll_transfers)
                p.handover = (dict(meta, num_groups=0), tensors)
            else:
                p.sends.append(self.runtime.transport.send(p.msg.decode_ucx, f"{req.rid}:meta", tensors, meta=meta))
            p.pages = pages
            p.sent_at = time.monotonic()
            del self.active[req.rid]
            self.transferring[req.rid] = p

    def _queue_write(self, p: Pending) -> bool:
        """CUDA IPC: queue the write of the request's pages into decode's behind the forward, so it
        is done once the first token is read back. False (and `_write_kv` writes, or reports why
        it cannot) when it could not be queued."""
        n, dst = self._prompt_pages(p), p.page_list.meta
        if self.ipc_pools is None or len(dst["pages"]) != n:
            return False
        try:
            self.ipc_pools.writer(dst["pool"], self.engine.kv_layers).copy(p.req.pages[:n], dst["pages"])
        except Exception:  # noqa: BLE001 - retried, and reported, by _write_kv
            log.exception("could not queue the CUDA IPC write of %s", p.msg.rid)
            return False
        return True

    def _write_kv(self, p: Pending) -> str | None:
        """CUDA IPC: the KV into decode's pages once it said which (unless queued behind the last
        layer, and so already there), then free ours and send the meta.

        None while decode's page list is not in; "" once written; else the error."""
        rid = p.msg.rid
        dst = p.page_list
        try:
            dst = dst or self.runtime.transport.poll(f"{rid}:kvdst")
        except Exception as e:  # noqa: BLE001 - a lost decode node fails this request only
            return str(e)
        if dst is None:
            waited = time.monotonic() - p.sent_at
            return None if waited < self.kv_timeout_s else f"no page list within {self.kv_timeout_s:.0f}s"
        assert p.handover is not None
        meta, tensors = p.handover
        p.handover = None
        n = self._prompt_pages(p)
        started = time.monotonic()
        try:
            if self.ipc_pools is None:
                raise ValueError("this prefill node is not on a GPU")
            if len(dst.meta["pages"]) != n:
                raise ValueError(f"decode reserved {len(dst.meta['pages'])} pages for a {n}-page prompt")
            if not p.write_queued:   # a queued write finished before the first token was read back
                self.ipc_pools.writer(dst.meta["pool"], self.engine.kv_layers).write(p.pages[:n], dst.meta["pages"])
        except Exception as e:  # noqa: BLE001 - decode must hear of it, then the request fails
            error = f"CUDA IPC write on prefill node {self.runtime.node_id} failed: {e}"
            self.runtime.transport.send(p.msg.decode_ucx, f"{rid}:meta", [], meta={"error": error})
            return error
        write_ms = (time.monotonic() - started) * 1e3
        self.engine.release(p.pages)
        log.info("KV of %s: %d pages (%d bytes) written into decode node %s through CUDA IPC %s", rid, n,
                 n * self.engine.bytes_per_page, p.msg.decode_node,
                 "behind the last layer" if p.write_queued else f"in {write_ms:.2f} ms")
        p.pages = []
        meta["timings"].update(kv_write_ms=write_ms, kv_written_at=time.time())
        p.sends.append(self.runtime.transport.send(p.msg.decode_ucx, f"{rid}:meta", tensors,
                                                   meta=dict(meta, ipc_written=True)))
        return ""

    def _prompt_pages(self, p: Pending) -> int:
        return self.engine.pages_for(p.req.prompt_len)

    def _unmap_dead_pools(self, every_s: float = 5.0) -> None:
        """Every few seconds: unmap the pools of decode nodes that left the registry."""
        now = time.monotonic()
        if not self.ipc_pools or now - self._last_pool_sweep < every_s:
            return
        self._last_pool_sweep = now
        live = {n.node_id for n in NodeRegistry(self.runtime.redis).list_nodes("decode")}
        for pool_id in self.ipc_pools.drop_orphans(live):
            log.info("unmapped the KV pool %s of a decode node that is gone", pool_id)

    def _poll_transfers(self) -> None:
        for rid, p in list(self.transferring.items()):
            ipc_error = self._write_kv(p) if p.handover is not None else ""
            if ipc_error is None or not all(f.done() for f in p.sends):
                continue
            del self.transferring[rid]
            self.engine.release(p.pages)
            errors = [f.exception() for f in p.sends if f.exception() is not None] + ([ipc_error] if ipc_error else [])
            if errors:
                error = f"KV transfer to decode node {p.msg.decode_node} failed: {errors[0]}"
                if self.rooms is not None:
                    self.rooms.mark_failed(rid, error, "transfer", self.runtime.node_id)
                self._report(p, "transfer", ok=False, error=error)
                continue
            reports = [f.result() for f in p.sends]
            nbytes = sum(r.nbytes for r in reports)
            seconds = time.monotonic() - p.sent_at
            if p.msg.kv_ipc:
                nbytes = self._prompt_pages(p) * self.engine.bytes_per_page
            else:
                log.info("KV of %s to %s: %d bytes in %.2f ms after the last layer (%.2f GB/s per message avg)",
                         rid, p.msg.decode_node, nbytes, seconds * 1e3,
                         sum(r.gbps for r in reports if r.seconds > 0) / max(1, len(reports)))
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
        self.engine.check_integrity([pg for p in self.transferring.values() for pg in p.pages])

    def status(self) -> dict[str, Any]:
        queues = {"awaiting_embeddings": len(self.awaiting), "prefilling": len(self.active),
                  "transferring": len(self.transferring)}
        return pool_status(self.engine, self.check_integrity, queues)

    def shutdown(self) -> None:
        for rid in list(self.active) + list(self.transferring) + list(self.awaiting):
            self._abort(rid)
