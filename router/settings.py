"""The router's HTTP-side settings: one frozen dataclass, built once at start-up (`from_cli`)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from epd.config import generation_defaults
from epd.media.loading import MediaLimits
from epd.periodic_stats import log_stats_interval

_MODALITIES = ("image", "video", "audio")   # vLLM's; only images reach this router, the others are moot


@dataclass(frozen=True)
class RouterSettings:
    """The router's options, from its command line (`from_cli`)."""

    model_path: str
    served_model_name: str                      # what responses name, and the metrics' model_name
    model_aliases: tuple[str, ...] = ()         # other names a request may give the model
    chat_template: str | None = None            # built-in name or file; None: the tokenizer's own
    api_key: str | None = None                  # required as "Authorization: Bearer KEY" on /v1/*
    allowed_local_media_path: str | None = None  # local image files are served only from here
    max_waiting: int = 1024                      # 429 while this many requests wait in the backend
    max_body_bytes: int = 64 << 20               # 413 above this
    media_limits: MediaLimits = field(default_factory=MediaLimits)
    tool_call_parser: str | None = None          # "hermes": tool_choice "auto" finds calls in the text
    sampling_defaults: dict = field(default_factory=dict)   # --generation-config: for fields a request leaves out
    stats_interval_s: float = 0.0                # the periodic stats line in the log; 0: none
    worker_metrics_dir: str | None = None        # one of several workers: /metrics sums theirs (router.worker_metrics)
    worker_index: int = 0

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> RouterSettings:
        media = args.allowed_local_media_path
        if media is not None and not os.path.isdir(media):
            raise ValueError(f"--allowed-local-media-path {media!r} is not a directory")
        return cls(
            model_path=args.model,
            served_model_name=(args.served_model_name or [args.model])[0],
            model_aliases=tuple((args.served_model_name or [args.model])[1:]),
            chat_template=args.chat_template,
            api_key=args.api_key,
            allowed_local_media_path=os.path.realpath(media) if media else None,
            max_waiting=args.max_waiting,
            max_body_bytes=args.max_body_bytes,
            media_limits=media_limits_from_cli(args),
            tool_call_parser=args.tool_call_parser,
            stats_interval_s=log_stats_interval(args),
            sampling_defaults=generation_defaults(args.generation_config, args.model),
            worker_metrics_dir=getattr(args, "worker_metrics_dir", None),
            worker_index=getattr(args, "worker_index", 0),
        )


def media_limits_from_cli(args: argparse.Namespace) -> MediaLimits:
    """The media flags as `MediaLimits`."""
    domains = args.allowed_media_domains
    return MediaLimits(
        fetch_timeout_s=args.media_fetch_timeout,
        max_images=(args.limit_mm_per_prompt or {}).get("image", MediaLimits.max_images),
        max_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        allowed_domains=frozenset(domains) if domains is not None else None,
        block_private_networks=args.block_private_media_networks,
    )


def parse_limit_mm_per_prompt(text: str) -> dict[str, int]:
    """vLLM's --limit-mm-per-prompt: JSON ('{"image": 4}'; a modality's value a count or {"count": 4, ...})
    or the legacy 'image=4,video=0'. Raises argparse.ArgumentTypeError, which argparse prints."""
    given: object = None
    if text.lstrip().startswith("{"):
        try:
            given = json.loads(text)
        except ValueError:
            pass
    else:
        pairs = [part.partition("=") for part in text.split(",")]
        if all(sep for _, sep, _ in pairs):
            given = {key.strip(): value.strip() for key, _, value in pairs}
    if not isinstance(given, dict) or not given:
        raise argparse.ArgumentTypeError(f"expected JSON like '{{\"image\": 4}}' or 'image=4', not {text!r}")
    return {modality: _item_count(modality, value) for modality, value in given.items()}


def _item_count(modality: str, value: object) -> int:
    if modality not in _MODALITIES:
        raise argparse.ArgumentTypeError(f"unknown modality {modality!r} (vLLM's are {', '.join(_MODALITIES)})")
    count = value.get("count") if isinstance(value, dict) else value
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise argparse.ArgumentTypeError(f"{modality}: the limit must be a whole number >= 0, not {count!r}")
    return count
