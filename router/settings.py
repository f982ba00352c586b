"""The router's HTTP-side settings: one frozen dataclass, built once at start-up (`from_cli`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from epd.media.loading import MediaLimits


@dataclass(frozen=True)
class RouterSettings:
    model_path: str
    served_model_name: str
    chat_template: str | None = None            # built-in name or file; None: the tokenizer's own
    api_key: str | None = None                  # required as "Authorization: Bearer KEY" on /v1/*
    allowed_local_media_path: str | None = None  # local image files are served only from here
    max_waiting: int = 1024                      # 429 while this many requests wait in the backend
    max_body_bytes: int = 64 << 20               # 413 above this
    media_limits: MediaLimits = field(default_factory=MediaLimits)
    tool_call_parser: str | None = None          # "hermes": tool_choice "auto" finds calls in the text

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> RouterSettings:
        media = args.allowed_local_media_path
        if media is not None and not os.path.isdir(media):
            raise ValueError(f"--allowed-local-media-path {media!r} is not a directory")
        return cls(
            model_path=args.model,
            served_model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
            chat_template=args.chat_template,
            api_key=args.api_key,
            allowed_local_media_path=os.path.realpath(media) if media else None,
            max_waiting=args.max_waiting,
            max_body_bytes=args.max_body_bytes,
            media_limits=MediaLimits(fetch_timeout_s=args.media_fetch_timeout),
            tool_call_parser=args.tool_call_parser,
        )
