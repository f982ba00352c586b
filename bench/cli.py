"""``python -m bench`` / ``epd bench``: benchmark any OpenAI-compatible chat server.

Lifecycle of an invocation (``main``):

1. parse the arguments into a frozen ``BenchConfig`` (bad values exit with status 2);
2. for each request rate (one, or every ``--sweep-rates`` point): build fresh requests
   (warm-up + measured; each sweep point gets its own seed so server-side prefix and
   encoder caches do not carry hits from one point into the next), run the traffic, reduce
   it to metrics and print the summary table;
3. after a sweep, print the sweep table with the highest rate that meets the SLOs;
4. write ``--output`` JSON and ``--plot`` PNGs.

Exit status: 0 when every run completed at least one request, 1 otherwise, 2 for bad
options or an unreadable dataset.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import math
import sys
from typing import Any

from bench.config import BenchConfig
from bench.datasets import DatasetError, build_requests
from bench.metrics import BenchMetrics, best_rate, compute_metrics
from bench.report import format_summary, format_sweep, run_to_dict, write_json
from bench.runner import RunResult, run_traffic


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=("random", "random-image", "jsonl"), default="random")
    g.add_argument("--dataset-path", help="FILE.jsonl for --dataset jsonl: one chat request body per line")
    g.add_argument("--num-prompts", type=int, default=100, help="measured requests per run")
    g.add_argument("--random-input-len", type=int, default=256, help="prompt text tokens (random datasets)")
    g.add_argument(
        "--random-output-len",
        type=int,
        default=128,
        help="max_tokens per request (also the default for jsonl lines without one)",
    )
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len*(1-r), len*(1+r)], 0 <= r < 1",
    )
    g.add_argument("--tokenizer", help="HF tokenizer path: make random prompts exactly --random-input-len tokens")
    g.add_argument("--images-per-request", type=int, default=1)
    g.add_argument("--image-resolution", default="720p", help="720p, 1080p, 480p, 4k or WxH")
    g.add_argument("--image-content", choices=("random", "blank"), default="random")
    g.add_argument("--image-format", choices=("png", "jpeg"), default="png")
    g.add_argument(
        "--image-repeat-ratio",
        type=float,
        default=0.0,
        help="share of images that repeat an earlier one (exercises encoder caches)",
    )


def _add_traffic_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("traffic")
    g.add_argument("--request-rate", type=float, default=math.inf, help="req/s, Poisson arrivals; inf = all at once")
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 more regular",
    )
    g.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    g.add_argument("--warmup-requests", type=int, default=0, help="sent first and not measured")
    g.add_argument("--sweep-rates", help="comma-separated request rates: one run per rate, e.g. 1,2,4,8")
    g.add_argument("--seed", type=int, default=0)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server and sampling")
    g.add_argument("--base-url", default="http://localhost:8000", help="server root, with or without /v1")
    g.add_argument("--model", required=True, help="model name sent in each request")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask the server to generate exactly max_tokens (default: on for random datasets, off for jsonl)",
    )
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request, end to end")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLOs and output")
    g.add_argument(
        "--slo",
        nargs="+",
        metavar="KEY=MS",
        help="per-request objectives for goodput: ttft_ms=..., tpot_ms=..., e2e_ms=...",
    )
    g.add_argument(
        "--slo-attainment",
        type=float,
        default=0.9,
        help="share of requests that must meet the SLOs for a sweep point to pass",
    )
    g.add_argument("--output", help="write the result (and configuration) as JSON here")
    g.add_argument("--plot", metavar="DIR", help="write TTFT/TPOT CDFs (and sweep plots) as PNGs here")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epd bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_client_args(p)
    _add_workload_args(p)
    _add_traffic_args(p)
    _add_output_args(p)
    return p


def _check(args: argparse.Namespace) -> None:
    """Reject values that would only fail (or mislead) later."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    if not 0.0 <= args.image_repeat_ratio <= 1.0:
        raise ValueError("--image-repeat-ratio must be in [0, 1]")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if not 0.0 < args.slo_attainment <= 1.0:
        raise ValueError("--slo-attainment must be in (0, 1]")
    if args.dataset == "jsonl" and not args.dataset_path:
        raise ValueError("--dataset jsonl needs --dataset-path")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ValueError("--plot needs matplotlib: pip install matplotlib") from exc


def run_point(cfg: BenchConfig, index: int) -> tuple[RunResult, BenchMetrics]:
    """Build the workload for one rate, run it and reduce it to metrics."""
    workload = dataclasses.replace(cfg.workload, seed=cfg.workload.seed + index)
    warm = cfg.traffic.warmup_requests
    if cfg.progress:
        print(f"building {warm + workload.num_prompts} {workload.dataset} requests...", file=sys.stderr)
    requests = build_requests(workload, warm + workload.num_prompts)
    result = asyncio.run(run_traffic(requests[warm:], requests[:warm], cfg.client, cfg.traffic, cfg.progress))
    return result, compute_metrics(result, cfg.slo)


def _payload(cfg: BenchConfig, results: list[RunResult], runs: list[BenchMetrics]) -> dict[str, Any]:
    run_dicts = [run_to_dict(r, m, cfg.traffic.burstiness) for r, m in zip(results, runs, strict=True)]
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": cfg.client.model,
        "base_url": cfg.client.base_url,
        "config": cfg.to_dict(),
    }
    if not cfg.sweep_rates:
        return {**run_dicts[0], **meta}
    best = best_rate(list(cfg.sweep_rates), runs)
    best_json = "inf" if best is not None and math.isinf(best) else best
    return {**meta, "slo_attainment_target": cfg.slo.attainment, "best_rate": best_json, "runs": run_dicts}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        cfg = BenchConfig.from_cli(args)
    except ValueError as exc:
        parser.error(str(exc))
    rates = list(cfg.sweep_rates) or [cfg.traffic.request_rate]
    results: list[RunResult] = []
    runs: list[BenchMetrics] = []
    for index, rate in enumerate(rates):
        try:
            result, metrics = run_point(cfg.with_rate(rate), index)
        except DatasetError as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
        results.append(result)
        runs.append(metrics)
        print(format_summary(metrics, result, cfg.slo.given), flush=True)
        if metrics.failed:
            first = next(o.error for o in result.outputs if not o.success)
            print(f"{metrics.failed} request(s) failed; first error: {first}", file=sys.stderr)
    if cfg.sweep_rates:
        print(format_sweep(rates, runs, best_rate(rates, runs), cfg.slo.attainment))
    if cfg.output:
        write_json(cfg.output, _payload(cfg, results, runs))
    if cfg.plot_dir:
        from bench.plots import write_plots

        write_plots(cfg.plot_dir, results, runs)
    return 0 if all(m.completed > 0 for m in runs) else 1
