"""LocalBackend: the Backend protocol over one in-process, colocated `EngineCore`.

The core is not thread-safe, so ONE background thread (the engine thread) owns it. A request's
lifecycle:

1. `generate()` (event loop) preprocesses the images of the router's processed input (or, for a
   bare request, processes it: tokenize, load and preprocess the images, expand the placeholders)
   in a worker thread; an `InputError` becomes a 400 `BackendError`.
2. It posts `_Add` on the command queue and waits on the request's own asyncio queue.
3. The engine thread applies commands (add / abort / stop), calls `core.step()` while there is
   work, and hands each `TokenEvent` to its request's queue with `loop.call_soon_threadsafe`.
4. The finished event ends the generator. If the consumer goes first (client disconnect,
   `aclose()`, cancellation), the generator's `finally` posts `_Abort` and the engine thread
   aborts the request in the core, which frees its KV pages.

A step that raises fails every in-flight request with a 500 and aborts it, so no page leaks.
Each time the core goes idle the engine thread runs `check_integrity()` (free + in use == total).

Timings (ms) on the finished event: queue_ms (submitted -> first scheduled), prefill_ms (first
scheduled -> first token; image encoding runs inside the step, so it is included here and
encode_ms is not reported), decode_ms (first token -> last token), transfer_ms = 0.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from epd.config import load_tokenizer
from epd.engine.engine_core import EngineConfig, EngineCore
from epd.engine.inputs import InputError, ProcessedInput
from epd.engine.request import Request, TokenEvent
from epd.engine.sampling import SamplingParams
from router.backend import BackendError, BackendEvent, BackendRequest, openai_finish_reason

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """One request's link from the engine thread back to its consumer's event loop."""

    rid: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    inp: ProcessedInput
    params: SamplingParams
    submitted: float                       # time.monotonic() when posted to the engine thread
    input_ms: float = 0.0                  # tokenizing, loading and preprocessing the images
    image_tokens: int = 0
    req: Request | None = None             # set by the engine thread once added to the core
    scheduled: float | None = None
    first_token: float | None = None

    def put(self, item: BackendEvent | BackendError) -> bool:
        """Hand an item to the consumer; False when its event loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:
            return False


@dataclass
class _Add:
    stream: _Stream


@dataclass
class _Abort:
    rid: str


@dataclass
class _Stop:
    done: threading.Event = field(default_factory=threading.Event)


class LocalBackend:
    def __init__(self, model_path: str, device: str | None = None, **engine_kwargs: Any) -> None:
        self.core = EngineCore(EngineConfig(model_path=model_path, device=device, **engine_kwargs),
                               load_tokenizer(model_path))
        self.model_name = os.path.basename(os.path.normpath(model_path))
        self.max_context = self.core.max_context
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}      # engine thread only
        self._unscheduled: set[str] = set()         # engine thread only
        self._inputs_lock = threading.Lock()        # the tokenizer is shared by the worker threads
        self._posted = 0                            # adds posted (event loop side)
        self._applied = 0                           # adds applied (engine thread side)
        self._snapshot: dict[str, float] = {}
        self._integrity_error: str | None = None
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="epd-engine", daemon=True)
        self._thread.start()

    # ---- Backend protocol (event loop side) ---------------------------------------------------
    async def generate(self, req: BackendRequest) -> AsyncIterator[BackendEvent]:
        if not self._thread.is_alive():
            raise BackendError("the engine thread has stopped", 503, code="engine_stopped")
        received = time.monotonic()
        inp = await self._process(req)
        stream = _Stream(req.rid, asyncio.get_running_loop(), asyncio.Queue(), inp, req.params,
                         time.monotonic(), image_tokens=sum(im.num_tokens for im in inp.images))
        stream.input_ms = (stream.submitted - received) * 1e3
        self._posted += 1
        self._commands.put(_Add(stream))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BackendError):
                    finished = True               # the engine thread already dropped the request
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._commands.put(_Abort(req.rid))

    async def _process(self, req: BackendRequest) -> ProcessedInput:
        def work() -> ProcessedInput:
            if req.inp is not None:   # the router's processing; only the pixels are left to do here
                inp = dataclasses.replace(req.inp, images=[copy.copy(im) for im in req.inp.images])  # per choice
                self.core.inputs.preprocess(inp.images)
                return inp
            with self._inputs_lock:
                return self.core.inputs.process(prompt=req.prompt, input_ids=req.input_ids,
                                                image_data=req.images or None)
        try:
            return await asyncio.to_thread(work)
        except ValueError as e:   # InputError, MediaError: the request is at fault
            raise BackendError(str(e), 400, getattr(e, "param", None)) from None

    async def health(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {"backend": "local", "device": str(self.core.device)}
        if self._integrity_error:
            details["integrity_error"] = self._integrity_error
        return self._thread.is_alive(), details

    def stats(self) -> dict[str, float]:
        out = dict(self._snapshot)
        out["num_requests_waiting"] = out.get("num_requests_waiting", 0.0) + max(0, self._posted - self._applied)
        return out

    async def close(self) -> None:
        if self._thread.is_alive():
            stop = _Stop()
            self._commands.put(stop)
            await asyncio.to_thread(stop.done.wait, 30.0)

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        was_busy = False
        while True:
            busy = self.core.has_work()
            stop = self._drain(block=not busy)
            if stop is not None:
                self._fail_all(BackendError("the server is shutting down", 503, code="shutting_down"))
                self._publish_stats()
                stop.done.set()
                return
            if self.core.has_work():
                self._step()
                was_busy = True
            elif was_busy:
                self._check_integrity()
                was_busy = False
            self._publish_stats()

    def _drain(self, block: bool) -> _Stop | None:
        """Apply queued commands, waiting for the first one when idle; the stop command if seen."""
        try:
            cmd = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return None
        while True:
            if isinstance(cmd, _Stop):
                return cmd
            if isinstance(cmd, _Add):
                self._add(cmd.stream)
            else:
                self._abort(cmd.rid)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return None

    def _add(self, s: _Stream) -> None:
        self._applied += 1
        if s.rid in self._streams:
            s.put(BackendError(f"request id {s.rid!r} is already in flight", 400, "rid"))
            return
        try:
            s.req = self.core.new_request(s.inp, s.params, s.rid)
            self.core.add(s.req)
        except InputError as e:
            s.put(BackendError(str(e), 400, e.param))
            return
        except Exception as e:  # noqa: BLE001 - reported to the client, the engine keeps serving
            log.exception("adding request %s failed", s.rid)
            s.put(BackendError(f"could not start the request: {e}", 500))
            return
        self._streams[s.rid] = s
        self._unscheduled.add(s.rid)

    def _abort(self, rid: str) -> None:
        if self._streams.pop(rid, None) is not None:
            self._unscheduled.discard(rid)
            self.core.abort(rid)

    def _step(self) -> None:
        started = time.monotonic()
        try:
            events = self.core.step()
        except Exception as e:  # noqa: BLE001 - fail the batch, keep the engine alive
            log.exception("engine step failed")
            self._fail_all(BackendError(f"engine step failed: {type(e).__name__}: {e}", 500))
            return
        now = time.monotonic()
        for rid in [r for r in self._unscheduled if self._streams[r].req.num_computed > 0]:  # type: ignore[union-attr]
            self._streams[rid].scheduled = started
            self._unscheduled.discard(rid)
        for ev in events:
            s = self._streams.get(ev.rid)
            if s is None:
                continue
            if ev.finished:
                del self._streams[ev.rid]
                self._unscheduled.discard(ev.rid)
            if not s.put(self._event(s, ev, started, now)) and not ev.finished:
                self._abort(ev.rid)            # nobody is listening any more

    def _event(self, s: _Stream, ev: TokenEvent, started: float, now: float) -> BackendEvent:
        req = s.req
        assert req is not None
        if s.first_token is None:
            s.first_token = now
        timings: dict[str, float] = {}
        if ev.finished:
            scheduled = s.scheduled or started
            timings = {"input_ms": s.input_ms, "queue_ms": (scheduled - s.submitted) * 1e3,
                       "prefill_ms": (s.first_token - scheduled) * 1e3,
                       "transfer_ms": 0.0, "decode_ms": (now - s.first_token) * 1e3}
        reason = ev.finish_reason or {}
        return BackendEvent(
            token_id=ev.token_id, text=ev.text, logprob=ev.logprob, top_logprobs=ev.top_logprobs,
            finished=ev.finished, finish_reason=openai_finish_reason(ev.finish_reason),
            matched_stop=reason.get("matched") if reason.get("type") == "stop" else None,
            prompt_tokens=req.prompt_len, completion_tokens=ev.completion_tokens, cached_tokens=req.cached_tokens,
            image_tokens=s.image_tokens, timings=timings)

    def _fail_all(self, error: BackendError) -> None:
        for rid, s in list(self._streams.items()):
            try:
                self.core.abort(rid)
            except Exception:  # noqa: BLE001 - keep failing the others
                log.exception("aborting %s failed", rid)
            s.put(error)
        self._streams.clear()
        self._unscheduled.clear()

    def _check_integrity(self) -> None:
        try:
            self.core.check_integrity()
            self._integrity_error = None
        except AssertionError as e:
            log.error("KV pool integrity check failed: %s", e)
            self._integrity_error = str(e)

    def _publish_stats(self) -> None:
        sched, pool = self.core.scheduler, self.core.kv.pool
        self._snapshot = {   # replaced whole, so readers on other threads see one consistent dict
            "num_requests_running": float(len(sched.running)),
            "num_requests_waiting": float(len(sched.waiting)),
            "kv_cache_usage_perc": pool.num_in_use / pool.capacity,
            "kv_cache_pages_in_use": float(pool.num_in_use),
            "kv_cache_pages_total": float(pool.capacity),
            "num_preemptions_total": float(sched.num_preemptions),
        }
