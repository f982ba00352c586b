"""DisaggBackend: one request split over the encoder, prefill and decode pools.

For each request: process the prompt (tokenize, image layouts from sizes, expand placeholders,
positions) -> pick one node per pool (prefill and decode must share a KV layout) -> open the
rendezvous room and the session in Redis -> send DecodeRequest (reserve pages), PrefillRequest,
EncodeRequest -> relay TokenDeltas as BackendEvents. A watchdog runs every 0.5 s while waiting:
a node whose registration expired before its stage finished, or a failure recorded in the
room, fails the request with an error naming the stage and the node. However the request ends
(finished, failed, cancelled by the client), every node still holding it gets an Abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from epd import protocol
from epd.config import ModelConfig, load_tokenizer
from epd.engine.inputs import InputProcessor, ProcessedInput
from kv_transfer.auth import ClusterSecret
from kv_transfer.cuda_ipc import ipc_pairable, ipc_writable
from kv_transfer.layout import KVLayout, LayoutMismatchError
from kv_transfer.redis_util import RedisWatch, connect
from kv_transfer.rooms import RoomStore
from kv_transfer.sessions import SessionStore, Stage
from router.backend import BackendError, BackendEvent, BackendRequest, openai_finish_reason
from router.node_client import NodeClients
from router.node_stats import NodeReport, gauges
from router.planning import foreseen_wait_s, pool_gauges, route, split_ready, work_of
from router.pool import NoNodeError, PoolView

log = logging.getLogger(__name__)
STAGE_OF_ROLE = {"encoder": "encode", "prefill": "prefill", "decode": "decode", "colocated": "generate"}
RETRY_AFTER_S = 2.0    # a 503 for want of Redis or of a node: when to try again
_DOWN = object()       # what a Redis call gives while Redis is down


@dataclasses.dataclass
class Flight:
    rid: str
    nodes: dict[str, Any]                       # role -> NodeInfo
    done: set[str] = dataclasses.field(default_factory=set)   # roles whose part is over
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    finished: bool = False
    received_at: float = 0.0                    # wall clock; nodes' `*_at` instants become ms after it

    def add_timings(self, timings: dict[str, float]) -> None:
        for key, value in timings.items():
            if key.endswith("_at"):
                self.timings[f"{key}_ms"] = (value - self.received_at) * 1e3
            else:
                self.timings[key] = value


class DisaggBackend:
    def __init__(self, model_path: str, redis_url: str, secret: ClusterSecret,
                 policy: str | dict[str, str] = "cache_aware", refresh_s: float = 0.5, request_timeout_s: float = 600.0,
                 max_model_len: int | None = None, ttft_target_ms: float = 0.0) -> None:
        self.config = ModelConfig.from_pretrained(model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.model_name = os.path.basename(os.path.normpath(model_path))
        self.max_model_len = max_model_len
        # the context is checked where the request is prepared (router.prompts) and again by the nodes
        self.inputs = InputProcessor(self.config, self.tokenizer, 1 << 62, with_pixels=False)
        self.redis = connect(redis_url)
        self.pool = PoolView(self.redis, secret, policy)
        self.rooms = RoomStore(self.redis)
        self.sessions = SessionStore(self.redis)
        self.clients = NodeClients(secret)
        self.redis_watch = RedisWatch("router")
        self.refresh_s = refresh_s
        self.request_timeout_s = request_timeout_s
        self.ttft_target_s = ttft_target_ms / 1e3   # 0: never refuse for a foreseen wait
        self.inflight: dict[str, Flight] = {}
        self.node_reports: dict[str, NodeReport] = {}
        self._refresher: asyncio.Task | None = None

    @property
    def max_context(self) -> int:
        """The smallest context the prefill, decode and colocated nodes publish (the model's before
        any has registered), within --max-model-len."""
        published = [n.max_context for role in ("prefill", "decode", "colocated")
                     for n in self.pool.nodes[role].values() if n.max_context > 0] \
            or [self.config.text.max_position_embeddings]
        return min(published + ([self.max_model_len] if self.max_model_len else []))

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._refresher is None:
            await asyncio.to_thread(self.redis_watch.call, self.pool.refresh)
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
            await self._poll_status()   # /metrics shows the nodes' pages from the first scrape on

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                if await asyncio.to_thread(self.redis_watch.call, self.pool.refresh, default=_DOWN) is _DOWN:
                    continue   # the last pools seen stand until Redis is back (requests get 503s meanwhile)
                live = {n.zmq for nodes in self.pool.nodes.values() for n in nodes.values()}
                self.clients.forget(live | {n.zmq for f in self.inflight.values() for n in f.nodes.values()})
                await self._poll_status()
            except Exception as e:  # noqa: BLE001 - Redis hiccups must not kill the router
                log.warning("pool refresh failed: %s", e)

    async def _poll_status(self) -> None:
        """Ask every live node for its status (for /metrics); a node that does not answer is marked so."""
        targets = [(role, node_id) for role, nodes in self.pool.nodes.items() for node_id in nodes]

        async def ask(role: str, node_id: str) -> NodeReport:
            try:
                return NodeReport(role, await self.node_status(role, node_id, timeout=max(self.refresh_s, 1.0)))
            except (TimeoutError, KeyError):
                return NodeReport(role, None)

        answers = await asyncio.gather(*(ask(role, node_id) for role, node_id in targets))
        self.node_reports = {node_id: report for (_, node_id), report in zip(targets, answers, strict=True)}
        for report in answers:
            if report.status is not None:
                self.pool.reported(report.status)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self.clients.close()

    async def health(self) -> tuple[bool, dict[str, Any]]:
        await self.start()
        sizes = self.pool.sizes()
        serving = bool(sizes["colocated"]) or split_ready(self.pool, with_images=True)
        return serving and self.redis_watch.up, {"pools": sizes, "redis": self.redis_watch.up}

    def stats(self) -> dict[str, float]:
        """vLLM's meanings: waiting = queued on a node for inputs, pages or compute; running = the rest
        of the requests in flight (encoding, prefilling, handing over, decoding)."""
        out = gauges(self.node_reports)
        out["num_requests_running"] = float(max(0, len(self.inflight) - out["num_requests_waiting"]))
        out["requests_in_flight"] = float(len(self.inflight))   # this router process's (summed over workers)
        out.update({f"pool_size_{role}": float(n) for role, n in self.pool.sizes().items()})
        out.update(pool_gauges(self.pool, self.node_reports))
        return out

    async def node_status(self, role: str, node_id: str, timeout: float = 5.0) -> protocol.NodeStatus:
        """Ask a node for its page pool / integrity status."""
        node = self.pool.nodes[role][node_id]
        nonce = uuid.uuid4().hex
        queue = self.clients.subscribe(nonce)
        try:
            await self.clients.send(node.zmq, protocol.StatusRequest(nonce))
            return await asyncio.wait_for(queue.get(), timeout)
        finally:
            self.clients.unsubscribe(nonce)

    # ---- one request ------------------------------------------------------------------------
    async def generate(self, req: BackendRequest) -> AsyncIterator[BackendEvent]:
        """The request's events. One whose encoder or prefill node failed before its first token
        is tried once more on other nodes of that pool (under rid `{rid}.retry`)."""
        await self.start()
        if not self.redis_watch.up:
            raise BackendError("the cluster's Redis is unavailable; retry shortly", 503, code="redis_unavailable",
                               retry_after=RETRY_AFTER_S)
        received = time.monotonic()
        try:
            inp = req.inp or await asyncio.to_thread(self.inputs.process, prompt=req.prompt,
                                                     input_ids=req.input_ids, image_data=req.images or None)
            if inp.images:   # what the encoder is sent: each image's encoded bytes and content hash, made once
                await asyncio.to_thread(self.inputs.attach_sources, inp.images)
        except ValueError as e:
            raise BackendError(str(e), 400, getattr(e, "param", None)) from None
        excluded: set[str] = set()
        for attempt in (0, 1):
            yielded = False
            try:   # closed with the caller's generator: the attempt's own cleanup runs at once
                async with contextlib.aclosing(self._attempt(req, inp, received, excluded, attempt)) as events:
                    async for event in events:
                        yielded = True
                        yield event
                return
            except BackendError as e:
                if attempt or yielded or not e.failed_node or not self._another(e.failed_role, e.failed_node):
                    raise
                log.warning("request %s: retrying without node %s (%s)", req.rid, e.failed_node, e)
                excluded.add(e.failed_node)

    def _another(self, role: str, node_id: str) -> bool:
        """Whether pool `role` has a live node other than `node_id`."""
        return any(other != node_id and not info.draining for other, info in self.pool.nodes.get(role, {}).items())

    async def _attempt(self, req: BackendRequest, inp: ProcessedInput, received: float, excluded: set[str],
                       attempt: int) -> AsyncIterator[BackendEvent]:
        if attempt:
            req = dataclasses.replace(req, rid=f"{req.rid}.retry")
        flight = await self._plan(req.rid, inp, excluded)
        flight.received_at = protocol.wall_time(received)
        flight.timings["input_ms"] = (time.monotonic() - received) * 1e3
        queue = self.clients.subscribe(req.rid)
        self.inflight[req.rid] = flight
        try:
            await self._dispatch(req, inp, flight)
            flight.add_timings({"dispatched_at": time.time()})
            async for event in self._relay(req, inp, flight, queue):
                yield event
        finally:
            self.clients.unsubscribe(req.rid)
            del self.inflight[req.rid]
            for node in flight.nodes.values():
                self.pool.end(node.node_id, req.rid)
            if not flight.finished:
                self._abort(flight)
            if self.redis_watch.up:
                await asyncio.to_thread(self._close_room, flight)

    async def _plan(self, rid: str, inp: ProcessedInput, excluded: set[str]) -> Flight:
        """Pick a node of each pool the request needs (from the pool view in memory; when a pool has
        no node to give, read the pools from Redis once more first: one may have just come up, as in
        a rolling restart), and refuse it (429) when its foreseen wait breaks the TTFT target."""
        nodes: dict[str, Any] = {}
        work = work_of(inp)
        try:
            try:
                route(self.pool, inp, work, excluded, nodes)
            except NoNodeError:
                await asyncio.to_thread(self.redis_watch.call, self.pool.refresh)
                nodes.clear()
                route(self.pool, inp, work, excluded, nodes)
        except NoNodeError as e:
            message = str(e)
            if "fits" in message and "decode" in message:
                message = await asyncio.to_thread(self._layout_mismatch, nodes["prefill"])
            raise BackendError(message, 503, code="no_capacity", retry_after=RETRY_AFTER_S) from None
        wait_s = foreseen_wait_s(self.pool, nodes, work) if self.ttft_target_s else 0.0
        if wait_s > self.ttft_target_s > 0:
            raise BackendError(f"the server is busy: this request would wait about {wait_s * 1e3:.0f} ms for its "
                               f"first token, over the {self.ttft_target_s * 1e3:.0f} ms target; retry later", 429,
                               code="overloaded", retry_after=max(1.0, wait_s - self.ttft_target_s))
        for role, node in nodes.items():
            self.pool.assign(role, node, work, rid)
            self.pool.begin(node.node_id)
        return Flight(rid, nodes)

    def _open(self, flight: Flight) -> None:
        """The request's rendezvous room and session in Redis."""
        nodes = flight.nodes
        self.rooms.open_room(flight.rid, nodes["prefill"].node_id, nodes["decode"].node_id)
        self.sessions.create(flight.rid, {role: n.node_id for role, n in nodes.items()})

    def _layout_mismatch(self, prefill: Any) -> str:
        """Name the fields in which the prefill node's KV layout differs from the decode pool's."""
        ours = self.redis.get(f"epd:layout:{prefill.layout_hash}")
        for decode in self.pool.nodes["decode"].values():
            theirs = self.redis.get(f"epd:layout:{decode.layout_hash}")
            if ours and theirs:
                try:
                    KVLayout.from_dict(json.loads(ours)).check_compatible(
                        KVLayout.from_dict(json.loads(theirs)), ours="prefill", theirs="decode")
                except (LayoutMismatchError, ValueError) as e:
                    return f"cannot pair prefill node {prefill.node_id} with decode node {decode.node_id}: {e}"
        return "KV layout mismatch between the prefill and decode pools"

    async def _dispatch(self, req: BackendRequest, inp: ProcessedInput, flight: Flight) -> None:
        params = _params_dict(req)
        images = [protocol.ImagePayload(im.source.width, im.source.height, im.source_rgb or b"", im.content_hash or "",
                                        im.layout.to_wire(), im.source_data) for im in inp.images]   # bytes or RGB
        if "colocated" in flight.nodes:   # one node does it all: no room, no hand-over
            await self.clients.send(flight.nodes["colocated"].zmq,
                                    protocol.GenerateRequest(req.rid, inp.input_ids, images, params))
            await self._redis(self.sessions.create, req.rid, {"colocated": flight.nodes["colocated"].node_id})
            return
        p, d = flight.nodes["prefill"], flight.nodes["decode"]
        # a cross-attention model's pool is not one tensor a layer: its KV travels over the wire only
        kv_ipc = ipc_pairable(p.kv_ipc, d.kv_ipc)
        emb_ipc = bool(inp.images) and ipc_writable(flight.nodes["encoder"].kv_ipc, p.kv_ipc)
        if inp.images:   # first: the encoder is the head of the critical path
            await self.clients.send(flight.nodes["encoder"].zmq, protocol.EncodeRequest(req.rid, images,
                                                                                       p.node_id, p.ucx, emb_ipc))
        await self._redis(self._open, flight)   # the encoder needs no room: it is already at work
        await self.clients.send(p.zmq, protocol.PrefillRequest(
            req.rid, inp.input_ids, [im.layout.to_wire() for im in inp.images], params, d.node_id, d.ucx,
            flight.nodes["encoder"].node_id if inp.images else "",
            encoder_ucx=flight.nodes["encoder"].ucx if inp.images else "", kv_ipc=kv_ipc,
            image_hashes=[im.content_hash or "" for im in inp.images], emb_ipc=emb_ipc,
            decode_ucx_ranks=d.rank_addresses()))
        await self.clients.send(d.zmq, protocol.DecodeRequest(
            req.rid, inp.input_ids, params, p.node_id, p.layout_hash, p.ucx, kv_ipc,
            [im.layout.to_wire() for im in inp.images] if inp.cross_rows else [], prefill_ucx_ranks=p.rank_addresses()))
        await self._redis(self.sessions.advance, req.rid, Stage.ENCODING if inp.images else Stage.PREFILLING)

    async def _redis(self, fn: Any, *args: Any) -> Any:
        """A Redis call on the request's path; while Redis is down the request is a 503."""
        result = await asyncio.to_thread(self.redis_watch.call, fn, *args, default=_DOWN)
        if result is _DOWN:
            raise BackendError("the cluster's Redis is unavailable; retry shortly", 503, code="redis_unavailable",
                               retry_after=RETRY_AFTER_S)
        return result

    async def _relay(self, req: BackendRequest, inp: ProcessedInput, flight: Flight,
                     queue: asyncio.Queue) -> AsyncIterator[BackendEvent]:
        deadline = time.monotonic() + self.request_timeout_s
        image_tokens = sum(im.num_tokens for im in inp.images)
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                await self._watchdog(flight, deadline)
                continue
            if isinstance(msg, protocol.StageReport):
                self._on_report(flight, msg)
                continue
            if msg.error and msg.bad_input:
                raise BackendError(msg.error, 400, param="messages")
            if msg.error:
                # before the first token, a hand-over that failed is the prefill node's doing
                blamed = flight.nodes["prefill"].node_id if msg.stage == "transfer" and "prefill" not in flight.done \
                    else ""
                raise BackendError(f"request failed at stage '{msg.stage}' on node {msg.node}: {msg.error}", 503,
                                   failed_node=blamed, failed_role="prefill")
            if "first_token_at_ms" not in flight.timings:
                flight.add_timings({"first_token_at": time.time()})
            flight.done.add("prefill")   # tokens flowing means the KV landed
            for i, tok in enumerate(msg.token_ids):
                last = msg.finished and i == len(msg.token_ids) - 1
                if last:
                    flight.finished = True
                    flight.add_timings(msg.timings)
                yield BackendEvent(
                    token_id=tok, text=msg.text if i == len(msg.token_ids) - 1 else "",
                    logprob=msg.logprobs[i] if msg.logprobs else None,
                    top_logprobs=[tuple(x) for x in msg.top_logprobs[i]] if msg.top_logprobs else None,
                    finished=last, finish_reason=openai_finish_reason(msg.finish_reason) if last else None,
                    matched_stop=(msg.finish_reason or {}).get("matched") if last else None,
                    prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens,
                    image_tokens=image_tokens, cached_tokens=msg.cached_tokens,
                    timings=dict(flight.timings) if last else {})
            if msg.finished:
                return

    def _on_report(self, flight: Flight, msg: protocol.StageReport) -> None:
        if not msg.ok and msg.info.get("bad_input") is True:   # the request's image, not the node
            raise BackendError(f"image could not be decoded: {msg.error.removeprefix('bad image: ')}", 400,
                               param="messages")
        if not msg.ok:   # embeddings that did not come are the encoder's doing, a failed hand-over decode's
            role = {"encode": "encoder", "transfer": "decode"}.get(msg.stage, "")
            blamed = flight.nodes[role].node_id if role in flight.nodes else ""
            raise BackendError(f"request failed at stage '{msg.stage}' on node {msg.node}: {msg.error}", 503,
                               failed_node=blamed, failed_role=role)
        flight.add_timings(msg.timings)
        flight.done.add({"encode": "encoder", "prefill": "prefill"}.get(msg.stage, msg.stage))

    async def _watchdog(self, flight: Flight, deadline: float) -> None:
        for role, node in flight.nodes.items():
            if role not in flight.done and not self.pool.still_up(node):
                raise BackendError(f"request failed at stage '{STAGE_OF_ROLE[role]}': {role} node {node.node_id} "
                                   f"stopped (its registration expired, or it restarted)", 503,
                                   failed_node=node.node_id, failed_role=role)
        room = await self._redis(self.rooms.get, flight.rid)
        if room is not None and room.failure is not None:
            f = room.failure
            # a hand-over that failed is the decode node's doing (gone, or not reading): retry elsewhere
            blamed = flight.nodes.get("decode") if f.stage == "transfer" else None
            raise BackendError(f"request failed at stage '{f.stage}' on node {f.node}: {f.reason}", 503,
                               failed_node=blamed.node_id if blamed else "", failed_role="decode" if blamed else "")
        if time.monotonic() > deadline:
            raise BackendError(f"request timed out after {self.request_timeout_s:.0f}s", 504)

    def _abort(self, flight: Flight) -> None:
        for node in flight.nodes.values():
            try:
                asyncio.ensure_future(self.clients.send(node.zmq, protocol.Abort(flight.rid)))
            except RuntimeError:  # no running loop (interpreter shutdown)
                pass

    def _close_room(self, flight: Flight) -> None:
        try:
            if "prefill" in flight.nodes:
                self.rooms.close(flight.rid)
            if flight.finished:
                self.sessions.advance(flight.rid, Stage.FINISHED)
            else:
                self.sessions.fail(flight.rid, "aborted or failed")
        except Exception as e:  # noqa: BLE001 - bookkeeping must not mask the request's outcome
            log.warning("closing room %s: %s", flight.rid, e)


def _params_dict(req: BackendRequest) -> dict:
    d = dataclasses.asdict(req.params)
    d.pop("extra", None)
    d["stop"] = list(d["stop"])
    d["stop_token_ids"] = list(d["stop_token_ids"])
    return d
