"""Colocated node: encode, prefill and decode of a request in one process, registered like the
other nodes (the data-parallel baseline every disaggregated figure is compared against, and the
pool that serves when splitting does not pay).

Queues, in order:
  preparing -> GenerateRequest received: its images are decoded (encoded bytes, held to the size
               the router declared) and preprocessed on worker threads (`ColocatedEngine.prepare`),
               so the loop keeps stepping the batch meanwhile; a bad image fails its request only
  engine    -> in the scheduler (waiting -> running): chunked, batched prefill with the prefix
               cache (keys include image hashes), then continuous batched decoding; the vision
               tower runs inside the step that first schedules the request's image tokens
Each token goes back to the router as a TokenDelta, the last one with the request's timings. An
Abort drops the request wherever it is; a step that raises fails the requests in the batch and
the node goes on. The page pool's integrity is checked each time the engine goes idle.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from epd import protocol
from epd.engine.engine_core import EngineCore
from epd.engine.inputs import ImageInput
from epd.engine.request import Request, TokenEvent
from epd.engine.role_engines import ColocatedEngine
from epd.engine.sampling import SamplingParams
from epd.media.encoded import EncodedImage
from epd.models.family import ImageLayout
from epd.node.runtime import pool_status, token_delta
from epd.node.throughput import Throughput

log = logging.getLogger(__name__)
STAGE = "generate"


@dataclass
class Stream:
    identity: bytes
    rid: str
    params: SamplingParams
    arrived: float
    prepared: Future | None = None
    prepared_ids: list[int] | None = None   # its prompt, while the pixels are prepared
    req: Request | None = None
    added: float = 0.0          # into the engine (pixels ready)
    scheduled: float = 0.0      # its first chunk computed
    first_token: float = 0.0


class ColocatedService:
    def __init__(self, core: EngineCore, prepare_threads: int = 2) -> None:
        self.engine = ColocatedEngine(core)
        self.preparing: dict[str, Stream] = {}
        self.streams: dict[str, Stream] = {}    # in the engine
        self.executor = ThreadPoolExecutor(prepare_threads, thread_name_prefix="epd-prepare")
        self.runtime: Any = None                # NodeRuntime, set by main
        self.refused = 0
        self.prompt_tokens = 0
        self.tokens_generated = 0
        self.throughput = Throughput()          # prompt tokens per busy second (NodeStatus.rates)
        self._was_busy = False

    # ---- control messages ---------------------------------------------------------------
    def handle(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, protocol.GenerateRequest):
            self._arrive(identity, msg)
        elif isinstance(msg, protocol.Abort):
            self._drop(msg.rid)

    def _arrive(self, identity: bytes, msg: protocol.GenerateRequest) -> None:
        if msg.rid in self.preparing or msg.rid in self.streams:
            self.refused += 1   # the request that has this id goes on untouched (a reply would reach it too)
            log.warning("refused a second request with id %r", msg.rid)
            return
        try:
            params = SamplingParams.from_dict(msg.params)
            images = [ImageInput(ImageLayout.from_wire(p.layout), content_hash=p.content_hash or None,
                                 source=_source(p)) for p in msg.images]
        except ValueError as e:
            self._fail(identity, msg.rid, str(e))
            return
        stream = Stream(identity, msg.rid, params, time.monotonic(), prepared_ids=msg.input_ids)
        stream.prepared = self.executor.submit(self.engine.prepare, msg.input_ids, images)
        self.preparing[msg.rid] = stream

    # ---- the loop ---------------------------------------------------------------------------
    def tick(self) -> bool:
        self._add_prepared()
        if not self.engine.has_work():
            if self._was_busy:
                self._was_busy = False
                self._check_idle_integrity()
            return False   # the loop sleeps (at most 5 ms) while only pixels are being prepared
        self._was_busy = True
        started, queued = time.monotonic(), self.engine.queued_prompt_tokens
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the batch, keep the node
            log.exception("engine step failed")
            for rid in list(self.streams):
                stream = self.streams.pop(rid)
                self.engine.abort(rid)
                self._fail(stream.identity, rid, f"engine step failed: {type(e).__name__}: {e}")
            return True
        self.throughput.add(queued - self.engine.queued_prompt_tokens, time.monotonic() - started)
        for stream in self.streams.values():
            if not stream.scheduled and stream.req is not None and stream.req.num_computed > 0:
                stream.scheduled = started
        self._emit(events)
        return True

    def _add_prepared(self) -> None:
        for rid, stream in list(self.preparing.items()):
            if not stream.prepared.done():
                continue
            del self.preparing[rid]
            try:
                stream.req = self.engine.new_request(stream.prepared.result(), stream.params, rid)
                self.engine.add(stream.req)
            except ValueError as e:   # InputError, MediaError: the request is at fault
                self._fail(stream.identity, rid, str(e), bad_input=True)
                continue
            except Exception as e:  # noqa: BLE001 - reported, the node keeps serving
                log.exception("preparing request %s failed", rid)
                self._fail(stream.identity, rid, f"could not start the request: {e}")
                continue
            stream.added = time.monotonic()
            self.streams[rid] = stream

    def _emit(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()
        for ev in events:
            stream = self.streams.get(ev.rid)
            if stream is None or stream.req is None:
                continue
            req = stream.req
            if not stream.first_token:
                stream.first_token = now
                self.prompt_tokens += req.prompt_len - req.cached_tokens
            self.tokens_generated += 1
            timings = {}
            if ev.finished:
                del self.streams[ev.rid]
                timings = self._timings(stream, now)
            self.runtime.send(stream.identity, token_delta(ev, req.prompt_len, req.cached_tokens, timings))

    @staticmethod
    def _timings(stream: Stream, now: float) -> dict[str, float]:
        scheduled = stream.scheduled or stream.first_token
        return {"prepare_ms": (stream.added - stream.arrived) * 1e3, "queue_ms": (scheduled - stream.added) * 1e3,
                "prefill_ms": (stream.first_token - scheduled) * 1e3, "transfer_ms": 0.0,
                "decode_ms": (now - stream.first_token) * 1e3,
                "colocated_received_at": protocol.wall_time(stream.arrived),
                "prefill_started_at": protocol.wall_time(scheduled)}

    def _fail(self, identity: bytes, rid: str, error: str, bad_input: bool = False) -> None:
        log.warning("request %s failed: %s", rid, error)
        self.runtime.send(identity, protocol.TokenDelta(rid, [], "", finished=True, error=error, stage=STAGE,
                                                        node=self.runtime.node_id, bad_input=bad_input))

    def _drop(self, rid: str) -> None:
        """Abort: free whatever the request holds (no reply is owed)."""
        stream = self.preparing.pop(rid, None)
        if stream is not None:
            stream.prepared.cancel()   # pixels being prepared are dropped when done
        if self.streams.pop(rid, None) is not None:
            self.engine.abort(rid)

    # ---- what it reports --------------------------------------------------------------------
    def load(self) -> float:
        return float(len(self.preparing) + len(self.streams))

    def held(self) -> int:
        return len(self.preparing) + len(self.streams)

    def counters(self) -> dict[str, float]:
        return {"prompt tokens": self.prompt_tokens, "generation tokens": self.tokens_generated}

    def check_integrity(self) -> None:
        self.engine.check_integrity([])

    def _check_idle_integrity(self) -> None:
        try:
            self.check_integrity()
        except AssertionError as e:
            log.error("KV pool integrity check failed: %s", e)

    def status(self) -> dict[str, Any]:
        engine = self.engine
        queues = {"preparing": len(self.preparing), "scheduler_waiting": engine.num_waiting,
                  "running": engine.num_running,
                  "queued_prompt_tokens": engine.queued_prompt_tokens + sum(
                      len(s.prepared_ids) for s in self.preparing.values())}
        return {**pool_status(engine, self.check_integrity, queues), "rates": {"prompt_tokens": self.throughput.rate}}

    def shutdown(self) -> None:
        for rid in list(self.preparing) + list(self.streams):
            self._drop(rid)
        self.executor.shutdown(wait=False, cancel_futures=True)


def _source(p: protocol.ImagePayload) -> EncodedImage | Image.Image:
    """An image as the router sent it: encoded bytes (decoded when the request is prepared) or RGB."""
    if p.data:
        return EncodedImage.declared(p.data, p.width, p.height)
    return Image.frombytes("RGB", (p.width, p.height), p.rgb)
