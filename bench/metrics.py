"""From per-request outputs to the figures a benchmark reports.

Lifecycle: after a run, ``compute_metrics(result, slo)`` reduces the ``RequestOutput``s to
one ``BenchMetrics``; nothing here talks to the network. Definitions (as vLLM and SGLang
use them):

- TTFT: send -> first chunk with content. ITL: gap between consecutive content chunks.
- TPOT: ``(E2E - TTFT) / (output_tokens - 1)`` for requests with more than one token.
- Throughputs divide successful work by the run's wall-clock ``duration``.
- A request is *good* when it succeeded and meets every given SLO (TPOT is only checked
  for requests with more than one output token); goodput = good requests / duration.
  SLO attainment = good / all measured requests, so failures count against it; without
  failures it equals goodput / request throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.client import RequestOutput
from bench.config import SLOConfig
from bench.runner import RunResult


@dataclass(frozen=True)
class Stats:
    """Summary of one latency distribution, in milliseconds."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    count: int = 0

    @classmethod
    def of(cls, samples_ms: list[float]) -> Stats:
        if not samples_ms:
            return cls()  # no sample: zeros, as vLLM reports, with count=0 to tell
        arr = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99]).tolist()
        return cls(float(arr.mean()), p50, float(arr.std()), p90, p99, int(arr.size))


def tpot_of(out: RequestOutput) -> float | None:
    """Seconds per output token after the first; None for one-token (or failed) outputs."""
    if not out.success or out.output_tokens <= 1:
        return None
    return (out.e2e - out.ttft) / (out.output_tokens - 1)


def is_good(out: RequestOutput, slo: SLOConfig) -> bool:
    if not out.success:
        return False
    if slo.ttft_ms is not None and out.ttft * 1e3 > slo.ttft_ms:
        return False
    if slo.e2e_ms is not None and out.e2e * 1e3 > slo.e2e_ms:
        return False
    tpot = tpot_of(out)
    return slo.tpot_ms is None or tpot is None or tpot * 1e3 <= slo.tpot_ms


@dataclass
class BenchMetrics:
    completed: int
    failed: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    total_text_input_tokens: int | None  # only when the server sends epd_prompt_tokens
    total_vision_input_tokens: int | None
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    good_requests: int
    request_goodput: float
    slo_attainment: float
    meets_slo: bool
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    epd_timings: dict[str, Stats] = field(default_factory=dict)


def _sum_reported(values: list[int | None]) -> int | None:
    reported = [v for v in values if v is not None]
    return sum(reported) if reported else None


def _stage_stats(outputs: list[RequestOutput]) -> dict[str, Stats]:
    """Stage timings from the EPD router (already in ms), per stage name."""
    per_stage: dict[str, list[float]] = {}
    for out in outputs:
        for stage, ms in (out.epd_timings or {}).items():
            per_stage.setdefault(stage, []).append(ms)
    return {stage: Stats.of(values) for stage, values in per_stage.items()}


def compute_metrics(result: RunResult, slo: SLOConfig) -> BenchMetrics:
    ok = [out for out in result.outputs if out.success]
    duration = max(result.duration, 1e-9)
    input_tokens = sum(out.prompt_tokens for out in ok)
    output_tokens = sum(out.output_tokens for out in ok)
    good = sum(1 for out in ok if is_good(out, slo))
    total = len(result.outputs)
    attainment = good / total if total else 0.0
    tpots = [t * 1e3 for t in (tpot_of(out) for out in ok) if t is not None]
    return BenchMetrics(
        completed=len(ok),
        failed=total - len(ok),
        duration=result.duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        total_text_input_tokens=_sum_reported([out.text_tokens for out in ok]),
        total_vision_input_tokens=_sum_reported([out.image_tokens for out in ok]),
        request_throughput=len(ok) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        good_requests=good,
        request_goodput=good / duration,
        slo_attainment=attainment,
        meets_slo=total > 0 and attainment >= slo.attainment,
        ttft=Stats.of([out.ttft * 1e3 for out in ok]),
        tpot=Stats.of(tpots),
        itl=Stats.of([gap * 1e3 for out in ok for gap in out.itls]),
        e2el=Stats.of([out.e2e * 1e3 for out in ok]),
        epd_timings=_stage_stats(ok),
    )


def best_rate(rates: list[float], runs: list[BenchMetrics]) -> float | None:
    """Highest swept rate whose run met the SLO attainment target (None if none did)."""
    passing = [rate for rate, m in zip(rates, runs, strict=True) if m.meets_slo]
    return max(passing) if passing else None
