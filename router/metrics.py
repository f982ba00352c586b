"""The router's Prometheus metrics, written in the text exposition format (0.0.4) by hand, so the
router needs no client library. Names follow vLLM's with an `epd:` prefix (':' is legal in
Prometheus metric names); every sample carries `model_name`.

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

from router.backend import BackendEvent

PREFIX = "epd:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0, 20.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0, 600.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if value != int(value) or abs(value) >= 1e15 else str(int(value))


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = PREFIX + name, help_text
        self.values: dict[Labels, float] = defaultdict(float)

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] += amount

    def lines(self) -> list[str]:
        out = _header(self.name, "counter", self.help)
        return out + [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.bounds = PREFIX + name, help_text, buckets
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = defaultdict(float)

    def observe(self, labels: Labels, value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.bounds) + 1))
        counts[bisect.bisect_left(self.bounds, value)] += 1    # le is inclusive
        self.sums[labels] += value

    def lines(self) -> list[str]:
        out = _header(self.name, "histogram", self.help)
        for labels, counts in sorted(self.counts.items()):
            running = 0
            for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
                running += n
                out.append(f"{self.name}_bucket{_labels((*labels, ('le', _number(bound))))} {running}")
            out.append(f"{self.name}_sum{_labels(labels)} {_number(self.sums[labels])}")
            out.append(f"{self.name}_count{_labels(labels)} {running}")
        return out


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
        out += _header(PREFIX + name, "gauge", f"{name.replace('_', ' ')} (from the backend)")
        out += [f"{PREFIX}{name}{_labels(labels)} {_number(v)}" for labels, v in samples]
    return out


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.model: Labels = (("model_name", model_name),)
        self.ttft = Histogram("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Time between successive tokens.", ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS)
        self.stage = Histogram("stage_seconds", "Time a request spent in each stage (backend timings).",
                               STAGE_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter("generation_tokens_total", "Generated tokens of finished requests.")
        self.cached_tokens = Counter("prefix_cache_hit_tokens_total",
                                     "Prompt tokens of finished requests whose KV came from the prefix cache.")
        self.success = Counter("request_success_total", "Requests that finished, by finish reason.")
        self.failure = Counter("request_failure_total", "Requests that failed or were abandoned, by reason.")

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self, stats: dict[str, float]) -> str:
        families: Iterable[Counter | Histogram] = (self.ttft, self.itl, self.e2e, self.stage, self.prompt_tokens,
                                                   self.cached_tokens, self.generation_tokens, self.success,
                                                   self.failure)
        lines = _gauge_lines(self.model, stats)
        for family in families:
            lines += family.lines()
        return "\n".join(lines) + "\n"


class RequestTimer:
    """Latency bookkeeping of one request."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token: dict[int, float] = {}   # choice -> when its last token came
        self.done = False

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return (time.monotonic() - self.arrival) * 1e3

    def token(self, event: BackendEvent, choice: int = 0) -> None:
        """TTFT at the request's first token (of any choice); inter-token gaps within each choice."""
        now = time.monotonic()
        m = self.metrics
        if not self.last_token:
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
        m.e2e.observe(m.model, time.monotonic() - self.arrival)
        m.prompt_tokens.inc(m.model, finals[0].prompt_tokens)
        m.cached_tokens.inc(m.model, finals[0].cached_tokens)   # as usage: the prompt once
        m.generation_tokens.inc(m.model, sum(f.completion_tokens for f in finals))
        m.success.inc((*m.model, ("finished_reason", finals[0].finish_reason or "unknown")))
        for event in finals:
            for key, ms in event.timings.items():
                if key.endswith("_ms") and not key.endswith("_at_ms") and ms is not None:
                    m.stage.observe((*m.model, ("stage", key[:-3])), ms / 1e3)

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
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            if match is None:
                raise ValueError(f"line {number}: not a sample: {line!r}")
            name, _, body, value = match.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            if family not in types:
                raise ValueError(f"line {number}: sample {name!r} has no # TYPE line before it")
            labels = tuple(sorted(_parse_labels(body or "", number)))
            out[(name, labels)] = float(value.replace("Inf", "inf"))
    _check_histograms(types, out)
    return out


def _parse_labels(body: str, number: int) -> list[tuple[str, str]]:
    labels, pos = [], 0
    while pos < len(body):
        match = _LABEL.match(body, pos)
        if match is None:
            raise ValueError(f"line {number}: bad labels {body!r}")
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
