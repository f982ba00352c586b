"""Drives one benchmark run against the server.

Lifecycle of a run (``run_traffic``):

1. open one ``httpx.AsyncClient`` (no connection cap, so the pool never queues requests
   inside a measured latency; no proxies from the environment);
2. probe ``GET /v1/models`` once, whatever it answers: the first request a process makes
   pays one-off costs (lazy imports in the HTTP stack, ~100 ms) that must not land in a
   measured TTFT; then send the warm-up requests (under the same concurrency cap) and drop
   their results;
3. start the clock, then release each measured request at ``start + offset[i]`` from the
   arrival process; with ``--max-concurrency`` a released request also waits for one of
   ``C`` slots, and its latencies start only once it is actually sent; with ``poll_s`` set,
   a ``QueuePoller`` scrapes the server's ``/metrics`` alongside, from the same start;
4. stop the clock when the last request has finished (and the poller); ``duration`` spans 3-4.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from bench.arrivals import arrival_offsets
from bench.client import RequestOutput, send_request
from bench.config import ClientConfig, TrafficConfig
from bench.datasets import BenchRequest
from bench.progress import Progress
from bench.server_queue import QueuePoller, QueueTrace


@dataclass
class RunResult:
    """Raw outcome of one run, before any statistics."""

    requests: list[BenchRequest]
    outputs: list[RequestOutput]
    duration: float  # seconds from the first release to the last completion
    request_rate: float
    max_concurrency: int | None
    peak_in_flight: int  # most requests the client had outstanding at once
    started_at: float = 0.0  # time.perf_counter() at the first release; outputs' start/end share the clock
    queue: QueueTrace | None = None  # the server's queue over the run; None when not polled

    @property
    def send_times(self) -> list[float]:
        """Seconds from the run's start to each request's send."""
        return [out.start - self.started_at for out in self.outputs]


@contextlib.asynccontextmanager
async def open_http(cfg: ClientConfig) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.request_timeout_s)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as http:
        yield http


async def probe(http: httpx.AsyncClient, cfg: ClientConfig) -> None:
    """One untimed request to warm the client; an unreachable server is only reported here."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        await http.get(cfg.models_url, headers=headers, timeout=min(cfg.request_timeout_s, 30.0))
    except httpx.HTTPError as exc:
        print(f"warning: {cfg.models_url} did not answer ({type(exc).__name__}: {exc})", file=sys.stderr)


class _Dispatcher:
    """Sends requests under the concurrency cap and counts what is in flight."""

    def __init__(self, http: httpx.AsyncClient, cfg: ClientConfig, max_concurrency: int | None) -> None:
        self.http = http
        self.cfg = cfg
        self.slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.in_flight = 0
        self.peak_in_flight = 0

    async def send(self, req: BenchRequest, progress: Progress | None = None) -> RequestOutput:
        async with self.slots if self.slots is not None else contextlib.nullcontext():
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                out = await send_request(self.http, self.cfg, req)
            finally:
                self.in_flight -= 1
        if progress is not None:
            progress.update(out.success)
        return out


async def run_traffic(
    requests: list[BenchRequest],
    warmup: list[BenchRequest],
    client: ClientConfig,
    traffic: TrafficConfig,
    show_progress: bool = True,
    poll_s: float | None = None,
    label: str = "",
) -> RunResult:
    """Send ``warmup`` (not measured), then ``requests`` on the arrival schedule; with ``poll_s``,
    scrape the server's queue every ``poll_s`` seconds meanwhile. ``label`` names the server
    on the progress bar."""
    offsets = arrival_offsets(len(requests), traffic.request_rate, traffic.burstiness, traffic.seed)
    async with open_http(client) as http:
        await probe(http, client)
        if warmup:
            warm = _Dispatcher(http, client, traffic.max_concurrency)
            await asyncio.gather(*(warm.send(req) for req in warmup))
        dispatcher = _Dispatcher(http, client, traffic.max_concurrency)
        rate = "inf" if math.isinf(traffic.request_rate) else f"{traffic.request_rate:g}"
        desc = f"{label} rate={rate} req/s" if label else f"rate={rate} req/s"
        progress = Progress(len(requests), desc, enabled=show_progress)
        tasks: list[asyncio.Task[RequestOutput]] = []
        start = time.perf_counter()
        poller = QueuePoller(http, client, start, poll_s) if poll_s else None
        polling = asyncio.create_task(poller.run()) if poller else None
        for req, offset in zip(requests, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(dispatcher.send(req, progress)))
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        progress.close()
        if polling is not None:
            polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polling
    return RunResult(
        requests=requests,
        outputs=outputs,
        duration=duration,
        request_rate=traffic.request_rate,
        max_concurrency=traffic.max_concurrency,
        peak_in_flight=dispatcher.peak_in_flight,
        started_at=start,
        queue=poller.trace if poller else None,
    )
