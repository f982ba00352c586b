"""The server's own queue, read from its Prometheus ``/metrics`` while a run is in flight.

Lifecycle: the runner starts one ``QueuePoller`` per measured run (after the warm-up, when
the run's clock starts) as a task on its event loop. The poller sends ``GET /metrics`` at the
server root (the base URL without ``/v1``) at once and then every ``interval_s``, and keeps the
sum over all series of ``vllm:num_requests_waiting`` and ``vllm:num_requests_running`` (EPD's
router, vLLM and SGLang with vLLM's names all export them). When the endpoint is missing (an
HTTP error status) or holds neither gauge before any sample is in, the poller stops and leaves
the reason in ``QueueTrace.note``; any other failed scrape (timeout, dropped connection) is
counted and the next one tried on schedule. Polling never fails the run. The runner cancels
the task when the last request has finished.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from bench.config import ClientConfig

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
SCRAPE_TIMEOUT_S = 5.0


@dataclass
class QueueTrace:
    """What the server said about its queue during one run; times in seconds from the run's start."""

    metrics_url: str
    interval_s: float
    times: list[float] = field(default_factory=list)
    waiting: list[float | None] = field(default_factory=list)  # None: that scrape lacked the gauge
    running: list[float | None] = field(default_factory=list)
    missed: int = 0  # scrapes that timed out or lost their connection
    note: str = ""  # why nothing was recorded ("" once a sample is in)

    def summary(self) -> str:
        """One line for the printed report."""
        if not self.times:
            return f"Server queue: not recorded ({self.note or 'the run ended before the first scrape'})"
        waiting = [w for w in self.waiting if w is not None]
        running = [r for r in self.running if r is not None]
        peaks = f"peak waiting {_peak(waiting)}, peak running {_peak(running)}"
        missed = f", {self.missed} scrape(s) failed" if self.missed else ""
        return f"Server queue ({self.metrics_url}): {len(self.times)} samples, {peaks}{missed}"


def parse_gauges(text: str, names: tuple[str, ...] = (WAITING, RUNNING)) -> dict[str, float]:
    """Prometheus text format -> {name: value summed over its series}, for ``names`` only."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)[0], line[line.rfind("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        if name not in names or not rest.split():
            continue
        try:
            value = float(rest.split()[0])
        except ValueError:
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


class QueuePoller:
    """Scrapes ``/metrics`` on a fixed schedule into a ``QueueTrace``."""

    def __init__(self, http: httpx.AsyncClient, cfg: ClientConfig, start: float, interval_s: float) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.start = start  # time.perf_counter() of the run's start
        self.trace = QueueTrace(metrics_url=cfg.metrics_url, interval_s=interval_s)

    async def scrape(self) -> tuple[dict[str, float] | None, str, bool]:
        """(the gauges, or None and why not, whether another try may get them)."""
        url = self.trace.metrics_url
        try:
            resp = await self.http.get(url, headers=self.headers, timeout=SCRAPE_TIMEOUT_S)
        except Exception as exc:  # whatever goes wrong with the scrape must not end the run
            return None, f"GET {url}: {type(exc).__name__}: {exc}".rstrip(": "), True
        if resp.status_code != 200:
            return None, f"GET {url}: HTTP {resp.status_code}", False
        gauges = parse_gauges(resp.text)
        return (gauges, "", True) if gauges else (None, f"GET {url}: no {WAITING} or {RUNNING} in it", False)

    async def run(self) -> None:
        """Scrape until cancelled; stops at once when the endpoint is missing or lacks the gauges."""
        trace = self.trace
        tick = 0
        while True:
            sent_at = time.perf_counter() - self.start
            gauges, why, retry = await self.scrape()
            if gauges is not None:
                trace.times.append(sent_at)
                trace.waiting.append(gauges.get(WAITING))
                trace.running.append(gauges.get(RUNNING))
                trace.note = ""
            elif not trace.times and not retry:
                trace.note = why
                return
            else:  # a dropped connection or a timeout: try again next time
                trace.missed += 1
                trace.note = trace.note if trace.times else why
            tick += 1
            await asyncio.sleep(max(0.0, self.start + tick * trace.interval_s - time.perf_counter()))


def _peak(values: list[float]) -> str:
    return f"{max(values):g}" if values else "n/a"
