"""A scripted OpenAI-compatible chat server for the benchmark-harness tests.

Lifecycle: ``with FakeChatServer(Script(...)) as server:`` starts a raw asyncio HTTP/1.1
server on a free localhost port in a background thread (its own event loop, so its timing
does not depend on the client's loop); ``server.base_url`` is what the harness targets;
leaving the block stops the loop and joins the thread.

Every request gets a mode from ``Script.modes`` (cycled in arrival order):

- ``ok``: SSE stream; first content chunk ``ttft_s`` after the request is admitted, then
  one chunk every ``itl_s`` (deadlines are absolute, so no drift), a finish chunk, a usage
  chunk (with ``epd_prompt_tokens`` and ``epd_timings`` when scripted) and ``[DONE]``;
- ``no_usage``: the same without the usage chunk;
- ``http500``: a JSON error with status 500;
- ``error_event``: one content chunk, then ``data: {"error": ...}``;
- ``drop``: two content chunks, then the connection is closed mid-body;
- ``stall``: headers, then silence for ``stall_s``;
- ``json``: stream ignored: after ``ttft_s`` one non-streamed completion (usage included).

With ``max_parallel`` set, requests beyond that many wait for a slot (the wait is part of
their TTFT), which models a server at capacity. The server records every request body, the
time it arrived, when it really wrote its first and last content chunk, and the most requests
it ever had open at once.

``GET /metrics`` answers in Prometheus' text format with vLLM's queue gauges, as EPD's router
does: ``vllm:num_requests_waiting`` (streams waiting for a ``max_parallel`` slot) and
``vllm:num_requests_running`` (streams holding one); ``Script(metrics=False)`` makes it a 404.

``run_harness`` runs the harness in-process against such a server and returns the raw
result with its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.config import ClientConfig, SLOConfig, TrafficConfig, WorkloadConfig
from bench.datasets import build_requests
from bench.metrics import BenchMetrics, compute_metrics
from bench.runner import RunResult, run_traffic


@dataclass(frozen=True)
class Script:
    ttft_s: tuple[float, ...] = (0.2,)  # cycled per request
    itl_s: float = 0.02
    num_tokens: int | None = None  # None: the request's max_tokens
    modes: tuple[str, ...] = ("ok",)
    prompt_tokens: int = 50
    epd_prompt_tokens: dict[str, int] | None = None
    epd_timings: dict[str, float] | None = None
    max_parallel: int | None = None
    stall_s: float = 5.0
    metrics: bool = True  # serve GET /metrics


@dataclass
class ServerLog:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.perf_counter() at receipt
    # seconds from receipt to the write of the first / last content chunk, by request index:
    # what the server really did, which a busy host's timers can put well after the script
    first_chunk_s: dict[int, float] = field(default_factory=dict)
    last_chunk_s: dict[int, float] = field(default_factory=dict)
    open_now: int = 0
    max_open: int = 0
    running_now: int = 0  # open streams past the max_parallel gate
    scrapes: int = 0  # GET /metrics answered
    connections: int = 0  # TCP connections accepted


def _sse(obj: Any) -> bytes:
    payload = obj if isinstance(obj, str) else json.dumps(obj)
    data = f"data: {payload}\n\n".encode()
    return f"{len(data):X}\r\n".encode() + data + b"\r\n"  # one HTTP chunk per event


def _chunk(index: int, content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    return {
        "id": f"chatcmpl-{index}",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


class FakeChatServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.log = ServerLog()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        if self.script.max_parallel:
            self._slots = asyncio.Semaphore(self.script.max_parallel)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.log.connections += 1
        try:
            while True:  # keep-alive: several requests per connection
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
                length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
                body = json.loads(await reader.readexactly(length) or b"{}")
                if not await self._respond(head[0].split(" ")[1], body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _respond(self, path: str, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        if path == "/metrics" and self.script.metrics:
            return self._metrics(writer)
        if path != "/v1/chat/completions":
            return self._plain(writer, 404, {"error": {"message": f"no route {path}"}})
        index = len(self.log.bodies)
        self.log.bodies.append(body)
        self.log.arrivals.append(time.perf_counter())
        mode = self.script.modes[index % len(self.script.modes)]
        if mode == "http500":
            return self._plain(writer, 500, {"error": {"message": "scripted internal error", "code": 500}})
        if mode == "json":
            await asyncio.sleep(self.script.ttft_s[index % len(self.script.ttft_s)])
            return self._plain(writer, 200, self._completion(index, int(body.get("max_tokens", 10))))
        self.log.open_now += 1
        self.log.max_open = max(self.log.max_open, self.log.open_now)
        try:
            async with self._slots if self._slots is not None else contextlib.nullcontext():
                self.log.running_now += 1
                try:
                    return await self._stream(index, mode, body, writer)
                finally:
                    self.log.running_now -= 1
        finally:
            self.log.open_now -= 1

    def _metrics(self, writer: asyncio.StreamWriter) -> bool:
        self.log.scrapes += 1
        labels = '{model_name="fake-model"}'
        waiting, running = self.log.open_now - self.log.running_now, self.log.running_now
        text = (
            "# HELP vllm:num_requests_running running\n# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {running:.1f}\n"
            "# HELP vllm:num_requests_waiting waiting\n# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {waiting:.1f}\n"
        ).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n"
            + f"content-length: {len(text)}\r\n\r\n".encode()
            + text
        )
        return True

    def _plain(self, writer: asyncio.StreamWriter, status: int, obj: Any) -> bool:
        data = json.dumps(obj).encode()
        writer.write(
            f"HTTP/1.1 {status} Scripted\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n".encode()
            + data
        )
        return True

    async def _stream(self, index: int, mode: str, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        s = self.script
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        if mode == "stall":
            await asyncio.sleep(s.stall_s)
            return False
        n = s.num_tokens if s.num_tokens is not None else int(body.get("max_tokens", 10))
        n = {"error_event": 1, "drop": 2}.get(mode, n)
        ttft = s.ttft_s[index % len(s.ttft_s)]
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + ttft + i * s.itl_s - loop.time()))
            writer.write(_sse(_chunk(index, f"tok{i} ")))
            await writer.drain()
            sent_after = time.perf_counter() - self.log.arrivals[index]
            self.log.first_chunk_s.setdefault(index, sent_after)
            self.log.last_chunk_s[index] = sent_after
        if mode == "drop":
            writer.transport.abort()  # no terminating chunk: the body is cut short
            return False
        if mode == "error_event":
            writer.write(_sse({"error": {"message": "scripted error event", "code": 503}}))
        else:
            writer.write(_sse(_chunk(index, finish="length")))
            if mode != "no_usage":
                writer.write(_sse(self._usage_chunk(index, n)))
        writer.write(_sse("[DONE]") + b"0\r\n\r\n")
        await writer.drain()
        return True

    def _completion(self, index: int, n: int) -> dict[str, Any]:
        completion = self._usage_chunk(index, n)
        completion["object"] = "chat.completion"
        message = {"role": "assistant", "content": "".join(f"tok{i} " for i in range(n))}
        completion["choices"] = [{"index": 0, "message": message, "finish_reason": "length"}]
        return completion

    def _usage_chunk(self, index: int, n: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.script.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.script.prompt_tokens + n,
        }
        chunk: dict[str, Any] = {"id": f"chatcmpl-{index}", "choices": [], "usage": usage}
        if self.script.epd_prompt_tokens:
            chunk["epd_prompt_tokens"] = self.script.epd_prompt_tokens
        if self.script.epd_timings:
            chunk["epd_timings"] = self.script.epd_timings
        return chunk


def run_harness(
    base_url: str,
    num_prompts: int,
    *,
    output_len: int = 10,
    warmup: int = 0,
    max_concurrency: int | None = None,
    request_rate: float = float("inf"),
    burstiness: float = 1.0,
    timeout_s: float = 10.0,
    slo: SLOConfig | None = None,
) -> tuple[RunResult, BenchMetrics]:
    """Run the harness in-process against ``base_url`` with a small random text workload."""
    workload = WorkloadConfig(num_prompts=num_prompts, random_input_len=20, random_output_len=output_len)
    requests = build_requests(workload, warmup + num_prompts)
    traffic = TrafficConfig(request_rate=request_rate, burstiness=burstiness, max_concurrency=max_concurrency, seed=1)
    client = ClientConfig(base_url=base_url, model="fake-model", request_timeout_s=timeout_s)
    result = asyncio.run(run_traffic(requests[warmup:], requests[:warmup], client, traffic, False))
    return result, compute_metrics(result, slo or SLOConfig())
