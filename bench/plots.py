"""PNG plots of runs, sweeps and comparisons (matplotlib, Agg backend, imported only when asked for).

Lifecycle: the CLI calls ``write_plots`` once, after every run has finished, with one
``ServerRuns`` per server (two with ``--compare-url``). It writes into ``--plot DIR``:

- ``ttft_cdf.png``, ``tpot_cdf.png``: one CDF line per run (per server and rate);
- for sweeps, ``sweep_throughput.png`` (request throughput and goodput of every server against
  the offered rate, with the ideal ``y = x``, the SLOs in the title and hollow markers where a
  rate misses the attainment target) and ``sweep_latency.png`` (median and p99 TTFT and TPOT
  against the rate, with a horizontal line at each SLO);
- per run, ``timeline_rate<R>.png`` (``timeline_<server>_rate<R>.png`` when comparing): the
  TTFT of each request against its send time, and below it the server's queue (waiting and
  running requests from ``/metrics``) over the same run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare import ServerRuns
from bench.config import SLOConfig
from bench.metrics import tpot_of
from bench.runner import RunResult


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cdf(plt: Any, path: Path, title: str, series: list[tuple[str, list[float]]], legend: str | None) -> Path:
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
        ax.legend(title=legend, fontsize="small")
    return _save(plt, fig, path)


def _cdfs(plt: Any, out_dir: Path, servers: list[ServerRuns]) -> list[Path]:
    named = len(servers) > 1
    labels, ttfts, tpots = [], [], []
    for server in servers:
        for r in server.results:
            rate = _rate_label(r.request_rate)
            labels.append(f"{server.label} @ {rate} req/s" if named else rate)
            ttfts.append([o.ttft * 1e3 for o in r.outputs if o.success])
            tpots.append([t * 1e3 for t in map(tpot_of, r.outputs) if t is not None])
    legend = None if named else "req/s"
    return [
        _cdf(plt, out_dir / "ttft_cdf.png", "TTFT", list(zip(labels, ttfts, strict=True)), legend),
        _cdf(plt, out_dir / "tpot_cdf.png", "TPOT", list(zip(labels, tpots, strict=True)), legend),
    ]


def _x_positions(rates: list[float]) -> tuple[list[float], list[str]]:
    """An ``inf`` rate is drawn one step right of the largest finite rate."""
    finite = [r for r in rates if not math.isinf(r)]
    stand_in = 2 * max(finite) if finite else 1.0
    return [stand_in if math.isinf(r) else r for r in rates], [_rate_label(r) for r in rates]


def _rate_axis(ax: Any, xs: list[float], labels: list[str], ylabel: str) -> None:
    ax.set_xticks(xs, labels)
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _sweep_throughput(plt: Any, path: Path, servers: list[ServerRuns], slo: SLOConfig) -> Path:
    xs, labels = _x_positions([r.request_rate for r in servers[0].results])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    named = len(servers) > 1
    for i, server in enumerate(servers):
        colour, name = f"C{i}", f"{server.label}: " if named else ""
        ms = server.metrics
        ax.plot(xs, [m.request_throughput for m in ms], "o--", color=colour, alpha=0.6, label=f"{name}throughput")
        ax.plot(xs, [m.request_goodput for m in ms], "-", color=colour, label=f"{name}goodput (meets SLOs)")
        passing = [(x, m.request_goodput) for x, m in zip(xs, ms, strict=True) if m.meets_slo]
        missing = [(x, m.request_goodput) for x, m in zip(xs, ms, strict=True) if not m.meets_slo]
        if passing:
            ax.scatter(*zip(*passing, strict=True), marker="s", color=colour, zorder=3)
        if missing:
            ax.scatter(*zip(*missing, strict=True), marker="s", facecolors="none", edgecolors=colour, zorder=3)
    ax.plot(xs, list(xs), ":", color="grey", label="offered rate")
    slo_text = slo.describe() if slo.given else "no SLO given: goodput = every successful request"
    ax.set_title(f"{slo_text}\nhollow square: attainment below the target", fontsize="medium")
    _rate_axis(ax, xs, labels, "req/s")
    return _save(plt, fig, path)


def _sweep_latency(plt: Any, path: Path, servers: list[ServerRuns], slo: SLOConfig) -> Path:
    xs, labels = _x_positions([r.request_rate for r in servers[0].results])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    named = len(servers) > 1
    for ax, key, limit in ((axes[0], "ttft", slo.ttft_ms), (axes[1], "tpot", slo.tpot_ms)):
        for i, server in enumerate(servers):
            name = f"{server.label}: " if named else ""
            stats = [getattr(m, key) for m in server.metrics]
            ax.plot(xs, [s.median for s in stats], "o-", color=f"C{i}", label=f"{name}median {key.upper()}")
            ax.plot(xs, [s.p99 for s in stats], "^--", color=f"C{i}", label=f"{name}p99 {key.upper()}")
        if limit is not None:
            ax.axhline(limit, color="red", linestyle=":", label=f"{key.upper()} SLO {limit:g} ms")
        ax.set_yscale("log")
        ax.set_title(f"{key.upper()} against offered rate")
        _rate_axis(ax, xs, labels, "ms")
    return _save(plt, fig, path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "server"


def _timeline(plt: Any, path: Path, title: str, result: RunResult, slo: SLOConfig) -> Path:
    """TTFT of each request at its send time; below it, the server's queue over the run."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    sends = result.send_times
    ok = [(t, o.ttft * 1e3) for t, o in zip(sends, result.outputs, strict=True) if o.success]
    failed = len(result.outputs) - len(ok)
    if ok:
        top.scatter(*zip(*ok, strict=True), s=10, label="TTFT of a request")
    if slo.ttft_ms is not None:
        top.axhline(slo.ttft_ms, color="red", linestyle=":", label=f"TTFT SLO {slo.ttft_ms:g} ms")
    top.set_ylabel("TTFT (ms)")
    top.set_title(f"{title}{f' ({failed} failed, not drawn)' if failed else ''}")
    top.grid(alpha=0.3)
    top.legend(fontsize="small")
    queue = result.queue
    if queue is not None and queue.times:
        for values, name in ((queue.waiting, "waiting"), (queue.running, "running")):
            pairs = [(t, v) for t, v in zip(queue.times, values, strict=True) if v is not None]
            if pairs:
                bottom.step(*zip(*pairs, strict=True), where="post", label=f"requests {name}")
        bottom.legend(fontsize="small")
    else:
        why = "polling off (--no-metrics-poll)" if queue is None else queue.note or "no sample"
        note = f"server queue not recorded:\n{why}"
        bottom.text(0.5, 0.5, note, ha="center", va="center", transform=bottom.transAxes, wrap=True)
    bottom.set_xlim(0, max([result.duration, *(queue.times if queue else [])]) * 1.02)  # the whole run
    bottom.set_ylabel("server queue (requests)")
    bottom.set_xlabel("seconds since the run started (request send time)")
    bottom.grid(alpha=0.3)
    return _save(plt, fig, path)


def _timelines(plt: Any, out_dir: Path, servers: list[ServerRuns], slo: SLOConfig) -> list[Path]:
    named = len(servers) > 1
    slugs = [_slug(s.label) for s in servers]
    if len(set(slugs)) < len(slugs):  # labels that differ only in punctuation
        slugs = ["base", "compare"]
    paths = []
    for server, slug in zip(servers, slugs, strict=True):
        for result in server.results:
            rate = _rate_label(result.request_rate)
            stem = f"timeline_{slug}_rate{rate}" if named else f"timeline_rate{rate}"
            title = f"{server.label + ', ' if named else ''}{rate} req/s"
            paths.append(_timeline(plt, out_dir / f"{stem}.png", title, result, slo))
    return paths


def write_plots(plot_dir: str, servers: list[ServerRuns], slo: SLOConfig) -> list[Path]:
    """Write the PNGs; returns their paths."""
    plt = _pyplot()
    out_dir = Path(plot_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _cdfs(plt, out_dir, servers)
    if len(servers[0].results) > 1:
        paths.append(_sweep_throughput(plt, out_dir / "sweep_throughput.png", servers, slo))
        paths.append(_sweep_latency(plt, out_dir / "sweep_latency.png", servers, slo))
    return paths + _timelines(plt, out_dir, servers, slo)
