"""`epd router`: the OpenAI-compatible HTTP server.

    epd router --model DIR [--port 8000] [--host 127.0.0.1] [--served-model-name NAME]
               [--chat-template NAME|FILE] [--api-key KEY] [--allowed-local-media-path DIR]
               [--redis-url URL] [--backend local|disagg] [--device cpu|cuda] ...

Lifecycle: parse the arguments -> check the chat template -> `make_backend(args)` (local: load
the model in-process; disagg: the node pools found through Redis) -> build the app ->
serve with uvicorn, printing `EPD router ready on http://HOST:PORT` once the socket listens
(`--port 0` picks a free port and prints it) -> on SIGINT / SIGTERM uvicorn stops, and the app's
shutdown closes the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

import uvicorn

from epd.engine.engine_args import add_engine_args, engine_flags, engine_kwargs
from epd.media.loading import MediaLimits
from epd.periodic_stats import add_log_stats_args
from kv_transfer.auth import ClusterSecret
from router.app import create_app
from router.backend import Backend
from router.prompts import PromptBuilder, check_chat_template
from router.settings import RouterSettings, parse_limit_mm_per_prompt
from router.tool_calls import PARSERS

log = logging.getLogger("epd.router")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="epd router", description="OpenAI-compatible router for EPD")
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--served-model-name", nargs="+", default=None,
                    help="the model id(s) clients may send; responses name the first (default: --model as given, "
                         "as vLLM's)")
    ap.add_argument("--chat-template", default=None, help="built-in name or .jinja/.json file (default: tokenizer's)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    ap.add_argument("--allowed-local-media-path", default=None, help="serve local image files from this directory")
    ap.add_argument("--max-waiting", type=int, default=1024, help="answer 429 while this many requests wait")
    ap.add_argument("--max-body-bytes", type=int, default=64 << 20, help="answer 413 above this request size")
    ap.add_argument("--media-fetch-timeout", type=float, default=10.0, help="seconds to fetch one image URL")
    _add_media_limit_args(ap)
    ap.add_argument("--tool-call-parser", default=None, choices=list(PARSERS),
                    help='how tool_choice "auto" finds calls in the answer (hermes: Qwen2/2.5 <tool_call> blocks); '
                         'without it "auto" is refused, "required" and named functions still work')
    ap.add_argument("--enable-auto-tool-choice", action="store_true", help="accepted for vLLM compatibility: "
                    "--tool-call-parser alone enables it")
    ap.add_argument("--backend", default=None, choices=["local", "disagg"],
                    help="disagg: the node pools in --redis-url (the default when it is given); local: in-process")
    ap.add_argument("--redis-url", default=os.environ.get("EPD_REDIS_URL"),
                    help="disagg: the Redis holding the node pools, redis[s]://[user:password@]host:port/db "
                         "(default: $EPD_REDIS_URL, which keeps a password off the command line)")
    ap.add_argument("--generation-config", default="auto",
                    help="vLLM's: sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty, "
                         "max_new_tokens) for what a request leaves out: auto = the checkpoint's "
                         "generation_config.json, a directory = its own, vllm = none")
    ap.add_argument("--uvicorn-log-level", default=None, choices=["critical", "error", "warning", "info", "debug",
                                                                  "trace"], help="uvicorn's own (default: --log-level)")
    ap.add_argument("--mm-processor-kwargs", default=None,
                    help="vLLM's; refused: set the image processor's options (e.g. Qwen2-VL's min_pixels / "
                         "max_pixels) in the checkpoint's preprocessor_config.json")
    _add_routing_args(ap)
    ap.add_argument("--cluster-secret-file", default=None,
                    help="disagg: the secret the nodes hold (default: $EPD_CLUSTER_SECRET_FILE, else "
                         "$EPD_CLUSTER_SECRET; epd serve makes one)")
    add_engine_args(ap.add_argument_group("engine (--backend local; with disagg only --max-model-len, a cap on "
                                          "the context the nodes publish)"))
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_log_stats_args(ap)
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM: stop accepting connections "
                    "and let the requests in flight finish within this many seconds (default: %(default)s)")
    ap.add_argument("--api-server-count", "-asc", type=int, default=1,
                    help="router processes serving the one port (vLLM's flag; node pools only): one process "
                         "tops out at one core (default: %(default)s)")
    # one of --api-server-count's workers (set by the parent): its listening socket, index, metrics directory
    ap.add_argument("--worker-socket-fd", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-metrics-dir", default=None, help=argparse.SUPPRESS)
    return ap


def _add_routing_args(ap: argparse.ArgumentParser) -> None:
    from router.routing import POLICIES

    g = ap.add_argument_group("routing (disagg)")
    g.add_argument("--routing-policy", default="cache_aware", choices=POLICIES,
                   help="how a node of each pool is picked: cache_aware (an image to the encoder that has its "
                        "embeddings, a prompt to the prefill or colocated node that has its prefix, unless that node "
                        "is much busier; least_load otherwise), least_load (least queued work, from the nodes' own "
                        "reports), round_robin (default: %(default)s)")
    for role in ("encoder", "prefill", "decode", "colocated"):
        g.add_argument(f"--{role}-policy", default=None, choices=POLICIES,
                       help=f"the {role} pool's policy (default: --routing-policy)")
    g.add_argument("--ttft-target-ms", type=float, default=0.0,
                   help="answer 429 (with Retry-After) to a request whose foreseen wait for its first token, from the "
                        "work queued on the nodes it would go to and their measured throughput, is over this; 0 = "
                        "never (default: %(default)s)")


def routing_policies(args: argparse.Namespace) -> dict[str, str]:
    return {role: getattr(args, f"{role}_policy") or args.routing_policy
            for role in ("encoder", "prefill", "decode", "colocated")}


def _add_media_limit_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--limit-mm-per-prompt", type=parse_limit_mm_per_prompt, default=None, metavar="JSON|image=N",
                    help=f"""most items of a modality per request, vLLM's: '{{"image": 4}}' or image=4 (images: """
                         f"{MediaLimits.max_images} by default); more is a 400 before anything is fetched")
    ap.add_argument("--max-image-pixels", type=int, default=MediaLimits.max_pixels,
                    help="most pixels in one image, read from its header before any pixel is decoded "
                         "(default: %(default)s; lower only, for now)")
    ap.add_argument("--max-request-pixels", type=int, default=MediaLimits.max_request_pixels,
                    help="most pixels in a request's images together, each image's counted before it is decoded "
                         "(default: %(default)s)")
    ap.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                    help="fetch image URLs only from these host names (every redirect hop too); default: any host")
    ap.add_argument("--block-private-media-networks", action="store_true",
                    help="refuse image URLs whose host resolves to a private, loopback or other non-global address "
                         "(link-local / cloud-metadata addresses are refused always)")


def backend_kind(args: argparse.Namespace) -> str:
    """--backend, or disagg when --redis-url is given, else local."""
    return args.backend or ("disagg" if args.redis_url else "local")


def make_backend(args: argparse.Namespace) -> Backend:
    """The backend named by `backend_kind`; extend here for new kinds."""
    kind = backend_kind(args)
    if kind == "local":
        from router.local_backend import LocalBackend

        return LocalBackend(args.model, **engine_kwargs(args))
    if kind == "disagg":
        if not args.redis_url:
            raise ValueError("--backend disagg needs --redis-url (the Redis the nodes register in)")
        engine, _ = engine_flags(sys.argv[1:] if args.argv is None else args.argv)
        ignored = [flag for flag in engine if flag.startswith("--") and flag != "--max-model-len"]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: engine flags for the nodes, not for a router over node pools "
                             f"(epd serve passes them to its nodes)")
        from router.pipeline import DisaggBackend

        secret = ClusterSecret.load(args.cluster_secret_file)
        backend = DisaggBackend(args.model, args.redis_url, secret, policy=routing_policies(args),
                                max_model_len=args.max_model_len, ttft_target_ms=args.ttft_target_ms)
        # one of several router processes: a prefix none of them told the others about is placed
        # by hashing, so they agree on its node (each keeps its own prefix index)
        backend.pool.hash_unseen_prefixes = getattr(args, "worker_socket_fd", None) is not None
        return backend
    raise ValueError(f"unknown backend {kind!r}")


async def _serve(server: uvicorn.Server, host: str, args: argparse.Namespace) -> None:
    worker = args.worker_socket_fd is not None
    sockets = [socket.socket(fileno=args.worker_socket_fd)] if worker else None
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        label = f"worker {args.worker_index} " if worker else ""
        print(f"EPD router {label}ready on http://{shown}:{port}", flush=True)
    await task


def check_args(args: argparse.Namespace) -> RouterSettings:
    """What can be checked before anything starts (`epd serve` calls it before its nodes load);
    ValueError / OSError say what is wrong."""
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model {args.model!r} is not a checkpoint directory (no config.json)")
    if args.mm_processor_kwargs is not None:
        raise ValueError("--mm-processor-kwargs is not supported; set the image processor's options (e.g. "
                         "min_pixels / max_pixels) in the checkpoint's preprocessor_config.json")
    settings = RouterSettings.from_cli(args)
    check_chat_template(settings.model_path, settings.chat_template)   # ChatTemplateError is a ValueError
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = check_args(args)
        if args.api_server_count > 1 and args.worker_socket_fd is None:
            if backend_kind(args) != "disagg":
                raise ValueError("--api-server-count > 1 needs node pools (--redis-url): a local backend's model "
                                 "lives in one process")
            from router.workers import run_workers

            return run_workers(args.api_server_count, args.host, args.port,
                               sys.argv[1:] if argv is None else list(argv))
        backend = make_backend(args)
    except (ValueError, OSError) as e:
        print(f"epd router: {e}", file=sys.stderr)
        return 2
    prompts = PromptBuilder(settings.model_path, lambda: backend.max_context, settings.chat_template,
                            settings.allowed_local_media_path, settings.media_limits)
    app = create_app(backend, settings, prompts)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level or args.log_level,
                            timeout_keep_alive=30, timeout_graceful_shutdown=args.drain_timeout)
    if settings.sampling_defaults:
        log.info("sampling defaults from the generation config: %s", settings.sampling_defaults)
    asyncio.run(_serve(uvicorn.Server(config), args.host, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
