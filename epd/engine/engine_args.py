"""The engine's command-line flags, defined once for every process that runs an engine: the
router's local backend and the encoder, prefill and decode nodes (`epd serve` hands them to its
nodes). `engine_kwargs(args)` turns the parsed flags into `EngineConfig` fields."""

from __future__ import annotations

import argparse
from typing import Any

# flag dest -> EngineConfig field
_FIELDS = {"device": "device", "dtype": "dtype", "page_size": "page_size", "max_model_len": "max_model_len",
           "max_running_requests": "max_running_requests", "max_step_tokens": "max_step_tokens",
           "kv_cache_tokens": "kv_cache_tokens", "mem_fraction": "mem_fraction",
           "disable_overlap_schedule": "disable_overlap_schedule",
           "disable_prefix_caching": "disable_prefix_caching", "disable_cuda_graph": "disable_cuda_graph"}


def add_engine_args(ap: argparse.ArgumentParser | Any) -> None:
    """Add the engine flags to `ap` (an argument parser or group)."""
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when present")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on a CPU, "
                                                  "the checkpoint's on a GPU)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="cap on prompt + output tokens (default: the model's, within the KV pool)")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--max-running-requests", type=int, default=64, help="batch size cap")
    ap.add_argument("--max-step-tokens", type=int, default=2048, help="tokens per forward (prefill chunk budget)")
    ap.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in tokens (default: from memory)")
    ap.add_argument("--mem-fraction", type=float, default=0.85,
                    help="share of the free GPU memory after the weights that the KV pool takes")
    ap.add_argument("--disable-overlap-schedule", action="store_true",
                    help="read each step's tokens before scheduling the next (default: each step is launched "
                         "while the step before still runs, see README)")
    ap.add_argument("--disable-prefix-caching", action="store_true",
                    help="compute every prompt in full (default: a prompt whose prefix is cached takes those KV "
                         "pages, see README; decode nodes compute no prompts)")
    ap.add_argument("--disable-cuda-graph", action="store_true", help="run decode steps eagerly on a GPU")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`EngineConfig` fields from flags parsed by a parser that `add_engine_args` filled."""
    return {field: getattr(args, dest) for dest, field in _FIELDS.items()}


def engine_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `argv` into (engine flags with their values, the rest), as `add_engine_args` parses them
    (`epd serve` gives the first to its nodes)."""
    ap = argparse.ArgumentParser(add_help=False)
    add_engine_args(ap)
    known, rest = ap.parse_known_args(argv)
    engine = []
    for action in ap._actions:
        value = getattr(known, action.dest, None)
        if value == action.default:
            continue
        engine += [action.option_strings[0]] + ([] if isinstance(value, bool) else [str(value)])
    return engine, rest
