"""The engine's command-line flags, defined once for every process that runs an engine: the
router's local backend and the encoder, prefill and decode nodes (`epd serve` hands them to its
nodes). `engine_kwargs(args)` turns the parsed flags into `EngineConfig` fields.

vLLM's names are taken where EPD does the same thing (`--gpu-memory-utilization`,
`--max-num-seqs`, `--enable-prefix-caching` / `--no-enable-prefix-caching`, `--seed`,
`--trust-remote-code`, `--tensor-parallel-size` / `-tp`).
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

# flag dest -> EngineConfig field
_FIELDS = {"device": "device", "dtype": "dtype", "page_size": "page_size", "max_model_len": "max_model_len",
           "max_running_requests": "max_running_requests", "max_step_tokens": "max_step_tokens",
           "kv_cache_tokens": "kv_cache_tokens", "mem_fraction": "mem_fraction",
           "gpu_memory_utilization": "gpu_memory_utilization", "seed": "seed",
           "disable_overlap_schedule": "disable_overlap_schedule",
           "disable_prefix_caching": "disable_prefix_caching", "disable_cuda_graph": "disable_cuda_graph",
           "tensor_parallel_size": "tensor_parallel_size"}


def device_name(text: str) -> str:
    """An engine's --device: cpu, cuda or cuda:N."""
    kind, sep, index = text.partition(":")
    if kind == "cpu" and not sep or kind == "cuda" and (not sep or index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda or cuda:N)")


def add_engine_args(ap: argparse.ArgumentParser | Any) -> None:
    """Add the engine flags to `ap` (an argument parser or group)."""
    ap.add_argument("--device", default=None, type=device_name,
                    help="cpu, cuda or cuda:N (GPU N of those visible; with -tp K, GPUs N..N+K-1) "
                         "(default: cuda when present)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on a CPU, "
                                                  "the checkpoint's on a GPU)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="cap on prompt + output tokens (default: the model's, within the KV pool)")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--max-running-requests", "--max-num-seqs", type=int, default=64,
                    help="batch size cap (--max-num-seqs: vLLM's name)")
    ap.add_argument("--max-step-tokens", type=int, default=2048, help="tokens per forward (prefill chunk budget)")
    ap.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in tokens (default: from memory)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="vLLM's: the share of the GPU's total memory this process may use (weights, "
                         "activations, KV pool); the KV pool takes what is left of it")
    ap.add_argument("--mem-fraction", type=float, default=0.85,
                    help="without --gpu-memory-utilization: the share of the GPU memory free after the weights "
                         "that the KV pool takes")
    ap.add_argument("--seed", type=int, default=None,
                    help="vLLM's: seeds the engine's random generator (requests without a seed of their own draw "
                         "from it, so a run repeats)")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="vLLM's: split the language model over this many processes, one per GPU (on a CPU: "
                         "processes over gloo); see README, Tensor parallelism")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="accepted for vLLM's command lines: EPD never runs a checkpoint's own code")
    ap.add_argument("--disable-overlap-schedule", action="store_true",
                    help="read each step's tokens before scheduling the next (default: each step is launched "
                         "while the step before still runs, see README)")
    ap.add_argument("--disable-prefix-caching", "--no-enable-prefix-caching", action="store_true",
                    help="compute every prompt in full (default: a prompt whose prefix is cached takes those KV "
                         "pages, see README; decode nodes compute no prompts)")
    ap.add_argument("--enable-prefix-caching", action="store_true",
                    help="accepted for vLLM's command lines: prefix caching is on by default")
    ap.add_argument("--disable-cuda-graph", "--enforce-eager", action="store_true",
                    help="run decode steps eagerly on a GPU (--enforce-eager: vLLM's name)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`EngineConfig` fields from flags parsed by a parser that `add_engine_args` filled."""
    return {field: getattr(args, dest) for dest, field in _FIELDS.items()}


def _refuse(message: str) -> NoReturn:
    raise ValueError(message)


def parse_or_raise(parser: argparse.ArgumentParser, argv: list[str],
                   known_only: bool = False) -> argparse.Namespace | tuple[argparse.Namespace, list[str]]:
    """`parser` on `argv`, raising ValueError with argparse's message instead of exiting (a
    launcher checks its children's options before it starts them)."""
    parser.exit_on_error = False
    parser.error = _refuse   # type: ignore[method-assign]
    try:
        return parser.parse_known_args(argv) if known_only else parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from None


def engine_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `argv` into (engine flags with their values, the rest), as `add_engine_args` parses them
    (`epd serve` gives the first to its nodes). ValueError on a value its flag cannot take."""
    ap = argparse.ArgumentParser(add_help=False)
    add_engine_args(ap)
    known, rest = parse_or_raise(ap, argv, known_only=True)
    engine = []
    for action in ap._actions:
        value = getattr(known, action.dest, None)
        if value == action.default:
            continue
        engine += [action.option_strings[0]] + ([] if isinstance(value, bool) else [str(value)])
    return engine, rest
