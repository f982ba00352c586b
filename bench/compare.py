"""Two servers, one workload: the side-by-side report of ``--compare-url``.

Lifecycle: the CLI keeps one ``ServerRuns`` per server (the base server first, then the
compare server; a plain run has only the first) and appends each run as it finishes. With
two servers it prints ``format_comparison`` after each rate (both servers' figures side by
side and the goodput ratio base / compare), ``format_compare_sweep`` after a sweep, and
writes ``compare_payload`` as the JSON result: each server's runs under ``base`` and
``compare``, the ratios under ``goodput_ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.config import ClientConfig, SLOConfig, json_rate
from bench.metrics import BenchMetrics, best_rate
from bench.report import rate_text, run_to_dict
from bench.runner import RunResult

LABEL_WIDTH = 32
COLUMN = 14


@dataclass
class ServerRuns:
    """One server's runs, one per offered rate, in the order they ran."""

    label: str
    client: ClientConfig
    results: list[RunResult] = field(default_factory=list)
    metrics: list[BenchMetrics] = field(default_factory=list)

    def add(self, result: RunResult, metrics: BenchMetrics) -> None:
        self.results.append(result)
        self.metrics.append(metrics)

    def best_rate(self) -> float | None:
        return best_rate([r.request_rate for r in self.results], self.metrics)


def goodput_ratio(base: BenchMetrics, other: BenchMetrics) -> float | None:
    """Goodput of the base server over the compare server's; None when the latter's is 0."""
    return base.request_goodput / other.request_goodput if other.request_goodput > 0 else None


def _ratio_text(ratio: float | None) -> str:
    return "n/a (compare goodput is 0)" if ratio is None else f"{ratio:.2f}"


def _peak_waiting(result: RunResult) -> str:
    waiting = [w for w in (result.queue.waiting if result.queue else []) if w is not None]
    return f"{max(waiting):g}" if waiting else "n/a"


def _cell(value: Any, width: int) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{text:>{width}}"


def _rows(m: BenchMetrics, result: RunResult) -> list[tuple[str, Any]]:
    return [
        ("Successful requests:", m.completed),
        ("Failed requests:", m.failed),
        ("Request throughput (req/s):", m.request_throughput),
        ("Request goodput (req/s):", m.request_goodput),
        ("SLO attainment (%):", 100.0 * m.slo_attainment),
        ("Output token throughput (tok/s):", m.output_throughput),
        ("Median TTFT (ms):", m.ttft.median),
        ("P99 TTFT (ms):", m.ttft.p99),
        ("Median TPOT (ms):", m.tpot.median),
        ("P99 TPOT (ms):", m.tpot.p99),
        ("Peak server queue (waiting):", _peak_waiting(result)),
    ]


def format_comparison(base: ServerRuns, other: ServerRuns, slo: SLOConfig) -> str:
    """Both servers' latest runs side by side, and the goodput ratio."""
    a, b = base.metrics[-1], other.metrics[-1]
    rate = base.results[-1].request_rate
    col = max(COLUMN, len(base.label) + 2, len(other.label) + 2)  # a column as wide as its label
    width = LABEL_WIDTH + 2 * col
    lines = [
        f" Comparison at {rate_text(rate)} req/s ".center(width, "="),
        slo.describe() if slo.given else "no SLO given: goodput counts every successful request",
        f"{'':<{LABEL_WIDTH}}{_cell(base.label, col)}{_cell(other.label, col)}",
    ]
    rows_a, rows_b = _rows(a, base.results[-1]), _rows(b, other.results[-1])
    for (name, va), (_, vb) in zip(rows_a, rows_b, strict=True):
        lines.append(f"{name:<{LABEL_WIDTH}}{_cell(va, col)}{_cell(vb, col)}")
    lines.append(f"Goodput ratio {base.label} / {other.label}: {_ratio_text(goodput_ratio(a, b))}")
    lines.append("=" * width)
    return "\n".join(lines)


def format_compare_sweep(base: ServerRuns, other: ServerRuns, target: float) -> str:
    head = (
        f"{'rate':>8}{'A good/s':>10}{'B good/s':>10}{'A/B':>7}{'A SLO%':>8}{'B SLO%':>8}"
        f"{'A TTFT99':>10}{'B TTFT99':>10}{'A TPOT99':>10}{'B TPOT99':>10}"
    )
    lines = [" Request Rate Sweep, two servers ".center(len(head), "="), f"A = {base.label}, B = {other.label}", head]
    for res, a, b in zip(base.results, base.metrics, other.metrics, strict=True):
        ratio = goodput_ratio(a, b)
        lines.append(
            f"{rate_text(res.request_rate):>8}{a.request_goodput:>10.2f}{b.request_goodput:>10.2f}"
            f"{'n/a' if ratio is None else f'{ratio:.2f}':>7}"
            f"{100 * a.slo_attainment:>8.1f}{100 * b.slo_attainment:>8.1f}"
            f"{a.ttft.p99:>10.1f}{b.ttft.p99:>10.1f}{a.tpot.p99:>10.1f}{b.tpot.p99:>10.1f}"
        )
    verdicts = [f"{s.label}: {_verdict(s.best_rate())}" for s in (base, other)]
    lines.append(f"Highest rate meeting the SLOs (attainment >= {100 * target:g}%): {'; '.join(verdicts)}")
    return "\n".join(lines)


def _verdict(rate: float | None) -> str:
    return "none" if rate is None else f"{rate_text(rate)} req/s"


def _server_dict(server: ServerRuns, burstiness: float) -> dict[str, Any]:
    return {
        "label": server.label,
        "base_url": server.client.base_url,
        "model": server.client.model,
        "best_rate": json_rate(server.best_rate()),
        "runs": [run_to_dict(r, m, burstiness) for r, m in zip(server.results, server.metrics, strict=True)],
    }


def compare_payload(meta: dict[str, Any], base: ServerRuns, other: ServerRuns, slo: SLOConfig) -> dict[str, Any]:
    """The JSON result of a comparison: ``meta`` (date, config), both servers, the ratios."""
    burstiness = meta["config"]["traffic"]["burstiness"]
    ratios = [
        {
            "request_rate": json_rate(res.request_rate),
            "base_goodput": a.request_goodput,
            "compare_goodput": b.request_goodput,
            "ratio": goodput_ratio(a, b),
        }
        for res, a, b in zip(base.results, base.metrics, other.metrics, strict=True)
    ]
    return {
        **meta,
        "slo_attainment_target": slo.attainment,
        "base": _server_dict(base, burstiness),
        "compare": _server_dict(other, burstiness),
        "goodput_ratio": ratios,
    }
