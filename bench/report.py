"""Human and machine readable results.

Lifecycle: after each run the CLI prints ``format_summary`` (the familiar
``==== Serving Benchmark Result ====`` table) and keeps ``run_to_dict``; after a sweep it
prints ``format_sweep``; finally ``write_json`` stores either the single run, or all runs
under ``runs`` with the best rate, each with the configuration under ``config``.

JSON conventions follow vLLM's ``benchmark_serving``: aggregate latencies in ms with
``mean_/median_/std_/p90_/p99_<metric>_ms`` keys, per-request arrays (``ttfts``, ``itls``,
``e2els``, ``tpots``) in seconds, ``null`` where a failed request has no value. EPD's own
additions per run: ``send_times`` (seconds from the run's start to each request's send) and
``server_queue`` (the server's ``/metrics`` queue gauges over the run, or ``null`` when not
polled).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.config import json_rate
from bench.metrics import BenchMetrics, Stats, tpot_of
from bench.runner import RunResult

WIDTH = 50
STAT_LABELS = {"mean": "Mean", "median": "Median", "std": "Std", "p90": "P90", "p99": "P99"}
LATENCIES = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def rate_text(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _stats_dict(stats: Stats) -> dict[str, float]:
    return {
        "mean": stats.mean,
        "median": stats.median,
        "std": stats.std,
        "p90": stats.p90,
        "p99": stats.p99,
        "count": stats.count,
    }


def _per_request(result: RunResult) -> dict[str, list[Any]]:
    outs = result.outputs
    return {
        "ttfts": [o.ttft if o.success else None for o in outs],
        "tpots": [tpot_of(o) for o in outs],
        "itls": [o.itls if o.success else [] for o in outs],
        "e2els": [o.e2e if o.success else None for o in outs],
        "input_lens": [o.prompt_tokens for o in outs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outs],
        "num_images": [r.num_images for r in result.requests],
        "errors": [o.error for o in outs],
        "epd_timings_per_request": [o.epd_timings for o in outs],
        "send_times": result.send_times,
    }


def run_to_dict(result: RunResult, m: BenchMetrics, burstiness: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "request_rate": json_rate(result.request_rate),
        "burstiness": burstiness,
        "max_concurrency": result.max_concurrency,
        "peak_concurrency": result.peak_in_flight,
        "completed": m.completed,
        "failed": m.failed,
        "duration": m.duration,
        "total_input_tokens": m.total_input_tokens,
        "total_output_tokens": m.total_output_tokens,
        "total_text_input_tokens": m.total_text_input_tokens,
        "total_vision_input_tokens": m.total_vision_input_tokens,
        "request_throughput": m.request_throughput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "request_goodput": m.request_goodput,
        "good_requests": m.good_requests,
        "slo_attainment": m.slo_attainment,
        "meets_slo": m.meets_slo,
    }
    for key, _, _ in LATENCIES:
        stats: Stats = getattr(m, key)
        for stat in STAT_LABELS:
            out[f"{stat}_{key}_ms"] = getattr(stats, stat)
    out["epd_timings"] = {stage: _stats_dict(s) for stage, s in m.epd_timings.items()}
    out.update(_per_request(result))
    out["server_queue"] = dataclasses.asdict(result.queue) if result.queue is not None else None
    return out


def _line(label: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<{WIDTH - 10}}{text:>10}"


def _heading(text: str, fill: str = "-") -> str:
    return f" {text} ".center(WIDTH, fill)


def format_summary(m: BenchMetrics, result: RunResult, slo_given: bool) -> str:
    lines = [
        _heading("Serving Benchmark Result", "="),
        _line("Request rate (req/s):", rate_text(result.request_rate)),
        _line("Max concurrency:", result.max_concurrency or "none"),
        _line("Successful requests:", m.completed),
        _line("Failed requests:", m.failed),
        _line("Benchmark duration (s):", m.duration),
        _line("Total input tokens:", m.total_input_tokens),
    ]
    if m.total_text_input_tokens is not None or m.total_vision_input_tokens is not None:
        lines.append(_line("  text input tokens:", m.total_text_input_tokens))
        lines.append(_line("  vision input tokens:", m.total_vision_input_tokens))
    lines += [
        _line("Total generated tokens:", m.total_output_tokens),
        _line("Request throughput (req/s):", m.request_throughput),
        _line("Request goodput (req/s):" if slo_given else "Goodput, no SLO given (req/s):", m.request_goodput),
        _line("SLO attainment (%):", 100.0 * m.slo_attainment),
        _line("Output token throughput (tok/s):", m.output_throughput),
        _line("Total token throughput (tok/s):", m.total_token_throughput),
    ]
    for key, short, title in LATENCIES:
        stats: Stats = getattr(m, key)
        lines.append(_heading(title))
        for stat in STAT_LABELS:
            lines.append(_line(f"{STAT_LABELS[stat]} {short} (ms):", getattr(stats, stat)))
    if m.epd_timings:
        lines.append(_heading("EPD server stage timings (ms)"))
        lines.append(f"{'stage':<20}{'mean':>10}{'median':>10}{'p99':>10}")
        for stage, s in m.epd_timings.items():
            lines.append(f"{stage:<20}{s.mean:>10.2f}{s.median:>10.2f}{s.p99:>10.2f}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep(rates: list[float], runs: list[BenchMetrics], best: float | None, target: float) -> str:
    head = (
        f"{'rate':>8}{'ok':>6}{'fail':>6}{'req/s':>9}{'good/s':>9}{'SLO %':>8}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}  meets"
    )
    lines = [_heading("Request Rate Sweep", "=").center(len(head), "="), head]
    for rate, m in zip(rates, runs, strict=True):
        lines.append(
            f"{rate_text(rate):>8}{m.completed:>6}{m.failed:>6}"
            f"{m.request_throughput:>9.2f}{m.request_goodput:>9.2f}{100 * m.slo_attainment:>8.1f}"
            f"{m.ttft.median:>10.1f}{m.ttft.p99:>10.1f}{m.tpot.median:>10.1f}"
            f"{m.tpot.p99:>10.1f}  {'yes' if m.meets_slo else 'no'}"
        )
    verdict = "none" if best is None else f"{rate_text(best)} req/s"
    lines.append(f"Highest rate meeting the SLOs (attainment >= {100 * target:g}%): {verdict}")
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2))
