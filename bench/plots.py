"""PNG plots of a run or a sweep (matplotlib, Agg backend, imported only when asked for).

Lifecycle: the CLI calls ``write_plots`` once, after every run has finished, with the runs
labelled by their request rate. It writes into ``--plot DIR``:

- ``ttft_cdf.png``, ``tpot_cdf.png``: one CDF line per run;
- for sweeps, ``sweep_throughput.png`` (request throughput and goodput against the offered
  rate, with the ideal ``y = x``) and ``sweep_latency.png`` (median and p99 TTFT / TPOT).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.metrics import BenchMetrics, tpot_of
from bench.runner import RunResult


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _cdf(plt: Any, path: Path, title: str, series: list[tuple[str, list[float]]]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series:
        if not values:
            continue
        xs = np.sort(np.asarray(values))
        ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
    ax.set_xlabel(f"{title} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title} CDF")
    if len(series) > 1:
        ax.legend(title="req/s", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _x_positions(rates: list[float]) -> tuple[list[float], list[str]]:
    """An ``inf`` rate is drawn one step right of the largest finite rate."""
    finite = [r for r in rates if not math.isinf(r)]
    stand_in = 2 * max(finite) if finite else 1.0
    return [stand_in if math.isinf(r) else r for r in rates], [_rate_label(r) for r in rates]


def _sweep(plt: Any, out_dir: Path, rates: list[float], runs: list[BenchMetrics]) -> list[Path]:
    xs, labels = _x_positions(rates)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [m.request_throughput for m in runs], "o-", label="request throughput")
    ax.plot(xs, [m.request_goodput for m in runs], "s-", label="goodput (meets SLOs)")
    ax.plot(xs, [x for x in xs], ":", color="grey", label="offered rate")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    throughput = out_dir / "sweep_throughput.png"
    fig.savefig(throughput, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, colour in (("ttft", "tab:blue"), ("tpot", "tab:orange")):
        ax.plot(xs, [getattr(m, name).median for m in runs], "o-", color=colour, label=f"median {name.upper()}")
        ax.plot(xs, [getattr(m, name).p99 for m in runs], "^--", color=colour, label=f"p99 {name.upper()}")
    ax.set_xticks(xs, labels)
    ax.set_yscale("log")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    latency = out_dir / "sweep_latency.png"
    fig.savefig(latency, dpi=100)
    plt.close(fig)
    return [throughput, latency]


def write_plots(plot_dir: str, results: list[RunResult], runs: list[BenchMetrics]) -> list[Path]:
    """Write the PNGs; returns their paths."""
    plt = _pyplot()
    out_dir = Path(plot_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [_rate_label(r.request_rate) for r in results]
    ttfts = [[o.ttft * 1e3 for o in r.outputs if o.success] for r in results]
    tpots = [[t * 1e3 for t in map(tpot_of, r.outputs) if t is not None] for r in results]
    paths = [out_dir / "ttft_cdf.png", out_dir / "tpot_cdf.png"]
    _cdf(plt, paths[0], "TTFT", list(zip(labels, ttfts, strict=True)))
    _cdf(plt, paths[1], "TPOT", list(zip(labels, tpots, strict=True)))
    if len(results) > 1:
        paths += _sweep(plt, out_dir, [r.request_rate for r in results], runs)
    return paths
