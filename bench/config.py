"""Frozen configuration of one benchmark invocation.

Lifecycle: ``cli.parse_args`` produces an ``argparse.Namespace``; ``BenchConfig.from_cli``
turns it once into the frozen dataclasses below; each component then receives only the
part it needs (the dataset builder a ``WorkloadConfig``, the runner a ``TrafficConfig`` and
a ``ClientConfig``, the metrics an ``SLOConfig``). With ``--compare-url`` a second
``ClientConfig`` (``compare``) describes the other server; everything else is shared, so both
servers get the same workload. ``BenchConfig.to_dict`` is what the JSON result stores under
``config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
NAMED_RESOLUTIONS = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080), "4k": (3840, 2160)}


def parse_resolution(text: str) -> tuple[int, int]:
    """``720p`` / ``1080p`` / ``WxH`` -> (width, height)."""
    key = text.strip().lower()
    if key in NAMED_RESOLUTIONS:
        return NAMED_RESOLUTIONS[key]
    parts = key.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"bad image resolution {text!r}: use 720p, 1080p or WxH such as 640x480")
    return int(parts[0]), int(parts[1])


def parse_slo(items: list[str] | None) -> dict[str, float]:
    """``["ttft_ms=200", "tpot_ms=50"]`` -> ``{"ttft_ms": 200.0, "tpot_ms": 50.0}``."""
    slo: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = "e2e_ms" if key.strip() == "e2el_ms" else key.strip()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {item!r}: expected one of {', '.join(SLO_KEYS)} as key=value")
        slo[key] = float(value)
        if slo[key] <= 0:
            raise ValueError(f"SLO {key} must be positive, got {value}")
    return slo


def parse_rates(text: str | None) -> tuple[float, ...]:
    """``"1,2,4,inf"`` -> ``(1.0, 2.0, 4.0, inf)``; empty when no sweep was asked for."""
    if not text:
        return ()
    rates = tuple(float(r) for r in text.split(",") if r.strip())
    if any(r <= 0 for r in rates):
        raise ValueError(f"sweep rates must be positive, got {text!r}")
    return rates


@dataclass(frozen=True)
class WorkloadConfig:
    """What the requests contain."""

    dataset: str = "random"  # random | random-image | jsonl
    num_prompts: int = 100
    random_input_len: int = 256
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    images_per_request: int = 1
    image_resolution: tuple[int, int] = (1280, 720)
    image_content: str = "random"  # random | blank
    image_format: str = "png"  # png | jpeg
    image_repeat_ratio: float = 0.0
    dataset_path: str | None = None
    tokenizer: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class TrafficConfig:
    """When the requests are sent."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup_requests: int = 0
    seed: int = 0


@dataclass(frozen=True)
class ClientConfig:
    """How each request is sent."""

    base_url: str = "http://localhost:8000"
    model: str = ""
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    request_timeout_s: float = 600.0

    @property
    def api_root(self) -> str:
        """``.../v1``, whether or not ``base_url`` already ends in ``/v1``."""
        base = self.base_url.rstrip("/").removesuffix("/chat/completions")
        return base if base.endswith("/v1") else base + "/v1"

    @property
    def chat_url(self) -> str:
        return self.api_root + "/chat/completions"

    @property
    def models_url(self) -> str:
        return self.api_root + "/models"

    @property
    def metrics_url(self) -> str:
        """Prometheus' ``/metrics`` at the server root (``api_root`` without ``/v1``)."""
        return self.api_root.removesuffix("/v1") + "/metrics"


@dataclass(frozen=True)
class SLOConfig:
    """Per-request service-level objectives; a request meeting all of them is 'good'."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    attainment: float = 0.9

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def describe(self) -> str:
        """``"SLO TTFT <= 200 ms, TPOT <= 50 ms; attainment >= 90%"`` for titles and tables."""
        limits = [
            f"{name} <= {ms:g} ms"
            for name, ms in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("E2E", self.e2e_ms))
            if ms is not None
        ]
        return f"SLO {', '.join(limits) or 'none'}; attainment >= {100 * self.attainment:g}%"


@dataclass(frozen=True)
class BenchConfig:
    workload: WorkloadConfig
    traffic: TrafficConfig
    client: ClientConfig
    slo: SLOConfig
    sweep_rates: tuple[float, ...] = ()
    output: str | None = None
    plot_dir: str | None = None
    progress: bool = True
    metrics_poll_s: float | None = 1.0  # None: do not scrape the server's /metrics
    compare: ClientConfig | None = None  # the second server of --compare-url
    labels: tuple[str, str] = ("", "")  # names of (base, compare) in reports

    @property
    def servers(self) -> list[tuple[str, ClientConfig]]:
        """(label, client) of every server to run against, in order: base, then compare."""
        pairs = [(self.labels[0], self.client)]
        if self.compare is not None:
            pairs.append((self.labels[1], self.compare))
        return pairs

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> BenchConfig:
        ignore_eos = args.ignore_eos if args.ignore_eos is not None else args.dataset != "jsonl"
        workload = WorkloadConfig(
            dataset=args.dataset,
            num_prompts=args.num_prompts,
            random_input_len=args.random_input_len,
            random_output_len=args.random_output_len,
            random_range_ratio=args.random_range_ratio,
            images_per_request=args.images_per_request,
            image_resolution=parse_resolution(args.image_resolution),
            image_content=args.image_content,
            image_format=args.image_format,
            image_repeat_ratio=args.image_repeat_ratio,
            dataset_path=args.dataset_path,
            tokenizer=args.tokenizer,
            seed=args.seed,
        )
        traffic = TrafficConfig(
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            warmup_requests=args.warmup_requests,
            seed=args.seed,
        )
        client = ClientConfig(
            base_url=args.base_url,
            model=args.model,
            api_key=args.api_key,
            temperature=args.temperature,
            ignore_eos=ignore_eos,
            request_timeout_s=args.request_timeout,
        )
        slo = SLOConfig(**parse_slo(args.slo), attainment=args.slo_attainment)
        compare = None
        if args.compare_url:
            compare = dataclasses.replace(
                client, base_url=args.compare_url, model=args.compare_model or args.model, api_key=args.compare_api_key
            )
        return cls(
            workload=workload,
            traffic=traffic,
            client=client,
            slo=slo,
            sweep_rates=parse_rates(args.sweep_rates),
            output=args.output,
            plot_dir=args.plot,
            progress=not args.no_progress,
            metrics_poll_s=None if args.no_metrics_poll else args.metrics_poll_interval,
            compare=compare,
            labels=server_labels(args.base_url, args.compare_url, args.label, args.compare_label),
        )

    def with_rate(self, rate: float) -> BenchConfig:
        """The same benchmark at another request rate (one point of a sweep)."""
        return dataclasses.replace(self, traffic=dataclasses.replace(self.traffic, request_rate=rate))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view; ``inf`` rates are written as the string ``"inf"``."""
        out = dataclasses.asdict(self)
        out["client"].pop("api_key", None)  # never write secrets into result files
        if self.compare is None:
            del out["compare"], out["labels"]
        else:
            out["compare"].pop("api_key", None)
        out["traffic"]["request_rate"] = json_rate(self.traffic.request_rate)
        out["sweep_rates"] = [json_rate(r) for r in self.sweep_rates]
        return out


def server_labels(
    base_url: str, compare_url: str | None, label: str | None, compare_label: str | None
) -> tuple[str, str]:
    """Report names of the two servers: as given, else host:port of each URL (made distinct)."""
    base = label or urlsplit(base_url).netloc or base_url
    if not compare_url:
        return base, ""
    other = compare_label or urlsplit(compare_url).netloc or compare_url
    if base == other:
        if label and compare_label:
            raise ValueError("--label and --compare-label must differ")
        base = base if label else f"{base} (base)"
        other = other if compare_label else f"{other} (compare)"
    return base, other


def json_rate(rate: float | None) -> float | str | None:
    """A rate for JSON: ``inf`` as the string ``"inf"`` (JSON has no infinity)."""
    if rate is None:
        return None
    return "inf" if math.isinf(rate) else rate
