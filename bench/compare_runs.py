"""Side by side, from sweeps run one after the other: `epd bench --compare-url` needs both servers
up at once, which two setups on one GPU cannot be (each takes the GPU's memory). Each setup's
sweep is written by a plain `epd bench --sweep-rates ... --output DIR/<setup>_<n>img.json`
(`bench/gpu_load.sh` does); this prints, per image count and offered rate, both setups' SLO
attainment, goodput, TTFT and TPOT, and the goodput ratio of the first setup to the second:

    python3 -m bench.compare_runs DIR [--setups split,colocated] [--markdown] [--slo ttft_ms=500 tpot_ms=25]

`--slo` scores every run again against another SLO from its per-request records (`ttfts`, `tpots`
in seconds, `errors`), as `epd bench` scores them: a request is good when it succeeded and meets
each bound (a one-token output has no TPOT).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

FILE = re.compile(r"(?P<setup>[a-z0-9_-]+?)_(?P<images>\d+)img\.json")


def load_sweeps(out_dir: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """{(setup, images per request): the sweep's runs, by rate} of every result file in `out_dir`."""
    sweeps: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for path in sorted(out_dir.glob("*img.json")):
        match = FILE.fullmatch(path.name)
        if match is None:
            continue
        payload = json.loads(path.read_text())
        runs = payload.get("runs", [payload])
        sweeps[(match["setup"], int(match["images"]))] = sorted(runs, key=lambda r: float(r["request_rate"]))
    return sweeps


def rescored(run: dict[str, Any], slo: dict[str, float]) -> dict[str, Any]:
    """`run` with its SLO attainment and goodput against `slo` (ttft_ms, tpot_ms)."""
    good = 0
    for ttft, tpot, error in zip(run["ttfts"], run["tpots"], run["errors"], strict=True):
        ok = not error and ttft is not None
        ok = ok and ("ttft_ms" not in slo or ttft * 1e3 <= slo["ttft_ms"])
        ok = ok and ("tpot_ms" not in slo or tpot is None or tpot * 1e3 <= slo["tpot_ms"])
        good += ok
    total = len(run["ttfts"])
    return {**run, "slo_attainment": good / total if total else 0.0,
            "request_goodput": good / max(run["duration"], 1e-9)}


def _cells(run: dict[str, Any] | None) -> list[str]:
    if run is None:
        return ["not run"] + [""] * 4
    return [f"{100 * run['slo_attainment']:.1f}%", f"{run['request_goodput']:.2f}",
            f"{run['median_ttft_ms']:,.0f}", f"{run['median_tpot_ms']:.1f} / {run['p99_tpot_ms']:.1f}",
            f"{run['failed']}"]


def comparison_rows(sweeps: dict[tuple[str, int], list[dict[str, Any]]], first: str,
                    second: str) -> list[list[str]]:
    """One row per (images, rate) that either setup ran."""
    rows = []
    for images in sorted({n for _, n in sweeps}):
        runs = {s: {float(r["request_rate"]): r for r in sweeps.get((s, images), [])} for s in (first, second)}
        for rate in sorted(set(runs[first]) | set(runs[second])):
            a, b = runs[first].get(rate), runs[second].get(rate)
            ratio = "n/a"
            if a is not None and b is not None and b["request_goodput"] > 0:
                ratio = f"{a['request_goodput'] / b['request_goodput']:.2f}"
            rows.append([str(images), f"{rate:g}", *_cells(a), *_cells(b), ratio])
    return rows


def header(first: str, second: str) -> list[str]:
    per_setup = ["SLO met", "goodput req/s", "TTFT p50 ms", "TPOT p50 / p99 ms", "failed"]
    return ["images", "rate", *[f"{first}: {h}" for h in per_setup], *[f"{second}: {h}" for h in per_setup],
            f"goodput {first} / {second}"]


def format_table(rows: list[list[str]], head: list[str], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in [head, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.compare_runs", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="directory of <setup>_<n>img.json sweep results")
    p.add_argument("--setups", default="split,colocated", help="FIRST,SECOND (the ratio is FIRST / SECOND)")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (for BENCHMARKS.md)")
    p.add_argument("--slo", nargs="+", default=None, metavar="KEY=MS",
                   help="score the runs against this SLO instead (ttft_ms=..., tpot_ms=...)")
    args = p.parse_args(argv)
    slo = {}
    for item in args.slo or []:
        key, _, value = item.partition("=")
        if key not in ("ttft_ms", "tpot_ms") or not value:
            p.error(f"--slo takes ttft_ms=MS and tpot_ms=MS, not {item!r}")
        slo[key] = float(value)
    first, _, second = args.setups.partition(",")
    if not second:
        p.error("--setups takes two names, FIRST,SECOND")
    sweeps = load_sweeps(args.out_dir)
    if not sweeps:
        print(f"no <setup>_<n>img.json results in {args.out_dir}", file=sys.stderr)
        return 1
    if slo:
        sweeps = {key: [rescored(run, slo) for run in runs] for key, runs in sweeps.items()}
    print(format_table(comparison_rows(sweeps, first, second), header(first, second), args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
