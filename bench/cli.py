"""``python -m bench`` / ``epd bench``: benchmark any OpenAI-compatible chat server.

Lifecycle of an invocation (``main``):

1. parse the arguments into a frozen ``BenchConfig`` (bad values exit with status 2);
2. for each request rate (one, or every ``--sweep-rates`` point): build fresh requests
   (warm-up + measured; each sweep point gets its own seed so server-side prefix and
   encoder caches do not carry hits from one point into the next), run the traffic (the
   server's ``/metrics`` queue scraped alongside), reduce it to metrics and print the
   summary table. With ``--compare-url`` the very same requests, on the same arrival
   schedule, then go to the second server (one server after the other, never both at once)
   and a side-by-side table is printed instead;
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

from bench.compare import ServerRuns, compare_payload, format_compare_sweep, format_comparison
from bench.config import BenchConfig, ClientConfig, json_rate
from bench.datasets import BenchRequest, DatasetError, build_requests
from bench.metrics import BenchMetrics, compute_metrics
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
    g.add_argument("--label", help="name of --base-url in reports; its host:port when not given")


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("second server (same workload, run after the first)")
    g.add_argument("--compare-url", help="also run the same workload against this server and report both")
    g.add_argument("--compare-model", help="model name for --compare-url; --model when not given")
    g.add_argument("--compare-api-key", help="API key for --compare-url (--api-key is not passed on)")
    g.add_argument("--compare-label", help="name of --compare-url in reports; its host:port when not given")


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
    g.add_argument("--plot", metavar="DIR", help="write TTFT/TPOT CDFs, sweep and over-time plots as PNGs here")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--no-metrics-poll",
        action="store_true",
        help="do not scrape the server's /metrics for its queue (vllm:num_requests_waiting/running)",
    )
    g.add_argument("--metrics-poll-interval", type=float, default=1.0, help="seconds between /metrics scrapes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epd bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_client_args(p)
    _add_compare_args(p)
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
    if args.metrics_poll_interval <= 0:
        raise ValueError("--metrics-poll-interval must be positive")
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("compare_model", "compare_api_key", "compare_label")
        if getattr(args, name)
    ]
    if given and not args.compare_url:
        raise ValueError(f"{', '.join(given)} needs --compare-url")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ValueError("--plot needs matplotlib: pip install matplotlib") from exc


def build_point(cfg: BenchConfig, index: int) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """The (measured, warm-up) requests of sweep point ``index``; every server gets these."""
    workload = dataclasses.replace(cfg.workload, seed=cfg.workload.seed + index)
    warm = cfg.traffic.warmup_requests
    if cfg.progress:
        print(f"building {warm + workload.num_prompts} {workload.dataset} requests...", file=sys.stderr)
    requests = build_requests(workload, warm + workload.num_prompts)
    return requests[warm:], requests[:warm]


def run_point(
    cfg: BenchConfig, server: ServerRuns, measured: list[BenchRequest], warmup: list[BenchRequest]
) -> tuple[RunResult, BenchMetrics]:
    """Run one rate's requests against one server and reduce them to metrics."""
    label = server.label if cfg.compare is not None else ""
    run = run_traffic(measured, warmup, server.client, cfg.traffic, cfg.progress, cfg.metrics_poll_s, label)
    result = asyncio.run(run)
    return result, compute_metrics(result, cfg.slo)


def _meta(cfg: BenchConfig, client: ClientConfig) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": client.model,
        "base_url": client.base_url,
        "config": cfg.to_dict(),
    }


def _payload(cfg: BenchConfig, servers: list[ServerRuns]) -> dict[str, Any]:
    if len(servers) == 2:
        return compare_payload(_meta(cfg, cfg.client), servers[0], servers[1], cfg.slo)
    server = servers[0]
    pairs = zip(server.results, server.metrics, strict=True)
    run_dicts = [run_to_dict(r, m, cfg.traffic.burstiness) for r, m in pairs]
    meta = _meta(cfg, cfg.client)
    if not cfg.sweep_rates:
        return {**run_dicts[0], **meta}
    best = json_rate(server.best_rate())
    return {**meta, "slo_attainment_target": cfg.slo.attainment, "best_rate": best, "runs": run_dicts}


def _report_run(cfg: BenchConfig, server: ServerRuns) -> None:
    """What is printed after each run: the summary (one server only), failures, the queue."""
    result, metrics = server.results[-1], server.metrics[-1]
    prefix = f"{server.label}: " if cfg.compare is not None else ""
    if not prefix:
        print(format_summary(metrics, result, cfg.slo.given), flush=True)
    if metrics.failed:
        first = next(o.error for o in result.outputs if not o.success)
        print(f"{prefix}{metrics.failed} request(s) failed; first error: {first}", file=sys.stderr)
    if result.queue is not None:
        print(prefix + result.queue.summary(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        cfg = BenchConfig.from_cli(args)
    except ValueError as exc:
        parser.error(str(exc))
    rates = list(cfg.sweep_rates) or [cfg.traffic.request_rate]
    servers = [ServerRuns(label, client) for label, client in cfg.servers]
    for index, rate in enumerate(rates):
        point = cfg.with_rate(rate)
        try:
            measured, warmup = build_point(point, index)
        except DatasetError as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
        for server in servers:  # one after the other: the servers may share GPUs
            server.add(*run_point(point, server, measured, warmup))
            _report_run(cfg, server)
        if len(servers) == 2:
            print(format_comparison(servers[0], servers[1], cfg.slo), flush=True)
    if cfg.sweep_rates and len(servers) == 2:
        print(format_compare_sweep(servers[0], servers[1], cfg.slo.attainment))
    elif cfg.sweep_rates:
        print(format_sweep(rates, servers[0].metrics, servers[0].best_rate(), cfg.slo.attainment))
    if cfg.output:
        write_json(cfg.output, _payload(cfg, servers))
    if cfg.plot_dir:
        from bench.plots import write_plots

        write_plots(cfg.plot_dir, servers, cfg.slo)
    return 0 if all(m.completed > 0 for server in servers for m in server.metrics) else 1
