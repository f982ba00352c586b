"""The router's Prometheus metrics, written in the text exposition format (0.0.4) by hand, so the
router needs no client library. Every family vLLM has and EPD measures is written under vLLM's own
name (`vllm:`) with vLLM's meaning, so a dashboard or autoscaler written for vLLM reads it unchanged,
and under EPD's (`epd:`) beside the families only EPD has (per pool, per stage); every sample
carries `model_name`.

Lifecycle: `RouterMetrics(model_name)` is built once per app. Each request gets a
`RequestTimer` at arrival; the serving code calls `token(event)` for every backend event, then
exactly one of `finished(event)` / `failed(reason)`. All of this runs on the event loop thread,
so nothing is locked. `render(stats)` writes every family for GET /metrics; the gauges are read
from `Backend.stats()` at scrape time.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable

from epd.periodic_stats import PeriodicStats, percent
from epd.prometheus_text import Labels, header, labels_text, number, process_families
from router.backend import BackendEvent

PREFIX = "epd:"
VLLM = "vllm:"
# backend gauges that are vLLM's too (same meaning); num_preemptions is vLLM's counter
VLLM_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
N_BUCKETS = (1, 2, 5, 10, 20)
PHASES = {"queue": "queue", "prefill": "prefill", "decode": "decode", "inference": "inference"}

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0, 20.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0, 600.0)

def _names(name: str, vllm: bool) -> tuple[str, ...]:
    """A family's names: EPD's, and vLLM's too where it is one of vLLM's."""
    return (PREFIX + name, VLLM + name) if vllm else (PREFIX + name,)


class Counter:
    def __init__(self, name: str, help_text: str, vllm: bool = False) -> None:
        self.names, self.help = _names(name, vllm), help_text
        self.values: dict[Labels, float] = defaultdict(float)

    def start(self, labels: Labels) -> None:
        """Write the series (at 0) before anything is counted, as vLLM does, so rates start at 0."""
        self.values[labels] += 0.0

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] += amount

    def lines(self) -> list[str]:
        out: list[str] = []
        for name in self.names:
            out += header(name, "counter", self.help)
            out += [f"{name}{labels_text(k)} {number(v)}" for k, v in sorted(self.values.items())]
        return out


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...], vllm: bool = False) -> None:
        self.names, self.help, self.bounds = _names(name, vllm), help_text, buckets
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = defaultdict(float)

    def start(self, labels: Labels) -> None:
        """Write the series (empty) before anything is observed, as vLLM does."""
        self.counts.setdefault(labels, [0] * (len(self.bounds) + 1))

    def observe(self, labels: Labels, value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.bounds) + 1))
        counts[bisect.bisect_left(self.bounds, value)] += 1    # le is inclusive
        self.sums[labels] += value

    def lines(self) -> list[str]:
        out: list[str] = []
        for name in self.names:
            out += header(name, "histogram", self.help)
            for labels, counts in sorted(self.counts.items()):
                running = 0
                for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
                    running += n
                    out.append(f"{name}_bucket{labels_text((*labels, ('le', number(bound))))} {running}")
                out.append(f"{name}_sum{labels_text(labels)} {number(self.sums[labels])}")
                out.append(f"{name}_count{labels_text(labels)} {running}")
        return out


BACKEND_COUNTERS = {"num_preemptions_total", "encoder_cache_hits_total", "encoder_cache_queries_total",
                    "routing_affinity_picks_total"}   # backend values that only grow (the rest are gauges)


def _gauge_lines(model: Labels, stats: dict[str, float]) -> list[str]:
    """Backend gauges: `name|<role>` (and `pool_size_<role>`) keys become one `epd:name{pool=...}` family."""
    families: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
    for key, value in sorted(stats.items()):
        if key.startswith("pool_size_"):
            key = "pool_size|" + key[len("pool_size_"):]
        if "|" in key:
            name, pool = key.split("|", 1)
            families[name].append(((*model, ("pool", pool)), value))
        else:
            families[re.sub(r"[^a-zA-Z0-9_:]", "_", key)].append((model, value))
    out: list[str] = []
    for name, samples in families.items():
        kind = "counter" if name in BACKEND_COUNTERS else "gauge"
        for prefix in (PREFIX, VLLM) if name in VLLM_GAUGES or name == "num_preemptions_total" else (PREFIX,):
            out += header(prefix + name, kind, f"{name.replace('_', ' ')} (from the backend)")
            out += [f"{prefix}{name}{labels_text(labels)} {number(v)}" for labels, v in samples]
    return out


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.model: Labels = (("model_name", model_name),)
        self.ttft = Histogram("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS,
                              vllm=True)
        self.itl = Histogram("inter_token_latency_seconds", "Time between successive tokens.", ITL_BUCKETS, vllm=True)
        self.tpot = Histogram("time_per_output_token_seconds", "A request's time per output token after the first.",
                              ITL_BUCKETS, vllm=True)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS,
                             vllm=True)
        self.stage = Histogram("stage_seconds", "Time a request spent in each stage (backend timings).",
                               STAGE_BUCKETS)
        self.phases = {key: Histogram(f"request_{phase}_time_seconds", f"A request's {phase} time.", E2E_BUCKETS,
                                      vllm=True) for key, phase in PHASES.items()}
        self.request_prompt = Histogram("request_prompt_tokens", "Prompt tokens of a finished request.",
                                        TOKEN_BUCKETS, vllm=True)
        self.request_generation = Histogram("request_generation_tokens", "Tokens a finished request generated.",
                                            TOKEN_BUCKETS, vllm=True)
        self.params_n = Histogram("request_params_n", "A request's n.", N_BUCKETS, vllm=True)
        self.params_max_tokens = Histogram("request_params_max_tokens", "A request's max_tokens.", TOKEN_BUCKETS,
                                           vllm=True)
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens of finished requests.", vllm=True)
        self.generation_tokens = Counter("generation_tokens_total", "Generated tokens of finished requests.",
                                         vllm=True)
        self.cached_tokens = Counter("prefix_cache_hit_tokens_total",
                                     "Prompt tokens of finished requests whose KV came from the prefix cache.")
        self.cache_queries = Counter("prefix_cache_queries_total",
                                     "Prompt tokens looked up in the prefix cache (vLLM's meaning).", vllm=True)
        self.cache_hits = Counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", vllm=True)
        self.success = Counter("request_success_total", "Requests that finished, by finish reason.", vllm=True)
        self.failure = Counter("request_failure_total", "Requests that failed or were abandoned, by reason.")
        for family in self.families():
            if family not in (self.stage, self.success, self.failure):
                family.start(self.model)
        for reason in ("stop", "length", "abort"):
            self.success.start((*self.model, ("finished_reason", reason)))
        self.failure.start((*self.model, ("reason", "client_disconnected")))   # other reasons: HTTP statuses

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def families(self) -> Iterable[Counter | Histogram]:
        return (self.ttft, self.itl, self.tpot, self.e2e, self.stage, *self.phases.values(), self.request_prompt,
                self.request_generation, self.params_n, self.params_max_tokens, self.prompt_tokens,
                self.cached_tokens, self.cache_queries, self.cache_hits, self.generation_tokens, self.success,
                self.failure)

    def stats_line(self, periodic: PeriodicStats, stats: dict[str, float]) -> str | None:
        """The periodic log line (as vLLM's): prompt and generation throughput, running, waiting, KV use."""
        counters = {"prompt throughput (tokens)": sum(self.prompt_tokens.values.values()),
                    "generation throughput (tokens)": sum(self.generation_tokens.values.values())}
        gauges: dict[str, float | str] = {"running": int(stats.get("num_requests_running", 0)),
                                          "waiting": int(stats.get("num_requests_waiting", 0)),
                                          "KV usage": percent(stats.get("kv_cache_usage_perc", 0.0), 1.0)}
        return periodic.line(counters, gauges)

    def render(self, stats: dict[str, float]) -> str:
        lines = _gauge_lines(self.model, stats)
        for family in self.families():
            lines += family.lines()
        return "\n".join(lines) + "\n" + process_families()   # and the process_* / python_* families


class RequestTimer:
    """Latency bookkeeping of one request."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token: dict[int, float] = {}   # choice -> when its last token came
        self.first_token = 0.0
        self.done = False
        self.n, self.max_tokens = 1, 0

    def params(self, n: int, max_tokens: int) -> None:
        """The request's n and (resolved) max_tokens."""
        self.n, self.max_tokens = n, max_tokens

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return (time.monotonic() - self.arrival) * 1e3

    def token(self, event: BackendEvent, choice: int = 0) -> None:
        """TTFT at the request's first token (of any choice); inter-token gaps within each choice."""
        now = time.monotonic()
        m = self.metrics
        if not self.last_token:
            self.first_token = now
            m.ttft.observe(m.model, now - self.arrival)
        elif choice in self.last_token:
            m.itl.observe(m.model, now - self.last_token[choice])
        self.last_token[choice] = now

    def finished(self, finals: list[BackendEvent]) -> None:
        """The request's end, with each choice's final event: the prompt counted once, every
        choice's tokens and stage times, the finish reason of the first choice."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        now = time.monotonic()
        m.e2e.observe(m.model, now - self.arrival)
        generated = sum(f.completion_tokens for f in finals)
        m.prompt_tokens.inc(m.model, finals[0].prompt_tokens)
        m.cached_tokens.inc(m.model, finals[0].cached_tokens)   # as usage: the prompt once
        m.cache_queries.inc(m.model, finals[0].prompt_tokens)
        m.cache_hits.inc(m.model, finals[0].cached_tokens)
        m.generation_tokens.inc(m.model, generated)
        m.request_prompt.observe(m.model, finals[0].prompt_tokens)
        m.request_generation.observe(m.model, generated)
        m.params_n.observe(m.model, self.n)
        m.params_max_tokens.observe(m.model, self.max_tokens)
        if finals[0].completion_tokens > 1 and self.first_token:
            m.tpot.observe(m.model, (now - self.first_token) / (finals[0].completion_tokens - 1))
        m.success.inc((*m.model, ("finished_reason", finals[0].finish_reason or "unknown")))
        for event in finals:
            for key, ms in event.timings.items():
                if key.endswith("_ms") and not key.endswith("_at_ms") and ms is not None:
                    m.stage.observe((*m.model, ("stage", key[:-3])), ms / 1e3)
        self._phases(finals[0].timings)

    def _phases(self, timings: dict[str, float]) -> None:
        """vLLM's queue / prefill / decode / inference times from the backend's stage timings."""
        m = self.metrics
        for key, histogram in m.phases.items():
            if key == "inference":
                seconds = (timings.get("prefill_ms") or 0.0) + (timings.get("decode_ms") or 0.0)
            else:
                seconds = timings.get(f"{key}_ms")
            if seconds is not None:
                histogram.observe(m.model, seconds / 1e3)

    def failed(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.metrics.failure.inc((*self.metrics.model, ("reason", reason)))


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_exposition(text: str) -> dict[tuple[str, Labels], float]:
    """Read the text format back strictly: {(sample name, sorted labels): value}. Raises ValueError
    on a malformed line, a sample outside its declared family, or a histogram whose buckets are not
    cumulative or whose +Inf bucket differs from its count. (Used by tests and tools that scrape.)"""
    types: dict[str, str] = {}
    out: dict[tuple[str, Labels], float] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            if match is None:
                raise ValueError(f"line {line_no}: not a sample: {line!r}")
            name, _, body, value = match.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            if family not in types:
                raise ValueError(f"line {line_no}: sample {name!r} has no # TYPE line before it")
            labels = tuple(sorted(_parse_labels(body or "", line_no)))
            out[(name, labels)] = float(value.replace("Inf", "inf"))
    _check_histograms(types, out)
    return out


def _parse_labels(body: str, line_no: int) -> list[tuple[str, str]]:
    labels, pos = [], 0
    while pos < len(body):
        match = _LABEL.match(body, pos)
        if match is None:
            raise ValueError(f"line {line_no}: bad labels {body!r}")
        labels.append((match.group(1), re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1),
                                              match.group(2))))
        pos = match.end()
    return labels


def _check_histograms(types: dict[str, str], samples: dict[tuple[str, Labels], float]) -> None:
    for family in [name for name, kind in types.items() if kind == "histogram"]:
        series: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for (name, labels), value in samples.items():
            if name == f"{family}_bucket":
                le = dict(labels)["le"]
                series[tuple(kv for kv in labels if kv[0] != "le")].append((float(le.replace("Inf", "inf")), value))
        for labels, buckets in series.items():
            counts = [v for _, v in sorted(buckets)]
            if counts != sorted(counts) or sorted(buckets)[-1][0] != math.inf:
                raise ValueError(f"{family}{dict(labels)}: buckets are not cumulative up to +Inf")
            if counts[-1] != samples.get((f"{family}_count", labels)):
                raise ValueError(f"{family}{dict(labels)}: the +Inf bucket differs from _count")
