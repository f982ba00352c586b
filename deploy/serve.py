"""`epd serve`: the whole system on one machine with one command.

    epd serve --model DIR|tiny-random [--encoders N --prefills N --decodes N] [--colocated N] [--port 8000]
              [--host 127.0.0.1] [--redis-url URL] [--device cpu|cuda] [engine flags, given to
              every node: --max-model-len N --dtype ...] [router options...]

Lifecycle: check every option and the port -> resolve the model (`tiny-random` /
`tiny-random-ARCH` builds a tiny checkpoint into ~/.cache/epd once) -> start a private Redis
unless --redis-url is given -> on a GPU shared by several nodes, start CUDA MPS (`deploy.mps`)
-> start the node processes and wait until each has registered ->
start the router and wait for /health -> print the URL -> keep every process up
(`deploy.supervisor`: what exits is started again, the rest keeps serving) -> on Ctrl-C /
SIGTERM stop the router, the nodes (each drains), then MPS and Redis (children also die with this
process, so none are orphaned).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import httpx

from deploy.gpu_placement import ROLES, Placement, place, shared_gpus
from deploy.gpu_placement import describe as describe_placements
from deploy.gpu_shares import describe, user_sized
from deploy.logs import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, LogPump
from deploy.mps import MPSDaemon
from deploy.procs import Cluster, die_with_parent
from deploy.redis_proc import PrivateRedis, free_port
from deploy.supervisor import Supervisor
from epd.engine.engine_args import engine_flags, parse_or_raise

if TYPE_CHECKING:
    from router.settings import RouterSettings

TINY_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "epd")
TINY_DEFAULT = "qwen2_5_vl"


def resolve_model(model: str) -> str:
    """A checkpoint directory as given; `tiny-random` (Qwen2.5-VL) or `tiny-random-ARCH` (any
    registered architecture) is a tiny random checkpoint, built into ~/.cache/epd once."""
    if model != "tiny-random" and not model.startswith("tiny-random-"):
        return model
    from epd.models import tiny_archs

    arch = model.removeprefix("tiny-random").removeprefix("-") or TINY_DEFAULT
    if arch not in tiny_archs():
        raise ValueError(f"--model {model}: no architecture {arch!r} (tiny-random-ARCH, ARCH one of "
                         f"{', '.join(tiny_archs())})")
    path = os.path.join(TINY_CACHE, f"tiny-random-{arch}")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        from epd.models.tiny_model import write_tiny_model

        print(f"building a tiny random {arch} checkpoint in {path}", flush=True)
        write_tiny_model(arch, path)
    return path


def _shown(url: str) -> str:
    """A Redis URL without its password."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog="epd serve", description="Run the router and the encoder / prefill / decode pools on this machine.",
        epilog="Engine options (--max-model-len, --dtype, --kv-cache-tokens, --gpu-memory-utilization, ...; see "
               "`epd prefill --help`) go to every node. Any other option goes to the router (see `epd router "
               "--help`: --served-model-name, --api-key, --chat-template, ...). All of them are checked before "
               "any node starts.")
    ap.add_argument("--model", required=True, help="HF checkpoint directory, or tiny-random (Qwen2.5-VL) / "
                    "tiny-random-ARCH (a tiny random checkpoint of any supported architecture)")
    ap.add_argument("--encoders", type=int, default=None, help="encoder nodes (the vision tower) (default: 1, "
                    "0 with --colocated)")
    ap.add_argument("--prefills", type=int, default=None, help="prefill nodes (default: 1, 0 with --colocated)")
    ap.add_argument("--decodes", type=int, default=None, help="decode nodes (default: 1, 0 with --colocated)")
    ap.add_argument("--colocated", type=int, default=0, help="colocated nodes (each encodes, prefills and decodes; "
                    "the router balances over them, and sends them text-only requests when there are split pools "
                    "too) (default: 0)")
    ap.add_argument("--mps", default="auto", choices=["auto", "on", "off"], help="CUDA MPS for nodes sharing the "
                    "GPU: auto starts it when more than one node runs on the GPU (default: %(default)s)")
    ap.add_argument("--gpus", default=None, help="GPUs to place the nodes on, comma-separated indices as visible "
                    "(default: every visible GPU); each node runs on its own GPU while there are enough, then they "
                    "share, splitting each GPU's memory")
    ap.add_argument("--port", type=int, default=8000, help="the router's HTTP port; 0 picks a free one "
                    "(default: 8000)")
    ap.add_argument("--host", default="127.0.0.1", help="the router's address (default: 127.0.0.1)")
    ap.add_argument("--redis-url", default=None, help="the Redis the nodes register in (default: start a private "
                    "redis-server, with a password, on a free port)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="where the nodes run (default: cuda "
                    "when there is a GPU)")
    ap.add_argument("--node-args", default="", help="extra arguments for every node, as one string "
                    "(e.g. \"--heartbeat-ttl 2\"; see `epd decode --help`)")
    ap.add_argument("--log-dir", default=None, help="where each process's log goes (default: a new temporary "
                    "directory, printed at start)")
    ap.add_argument("--log-max-mb", type=float, default=DEFAULT_MAX_BYTES / (1 << 20),
                    help="a log file is rotated at this size (default: %(default)s)")
    ap.add_argument("--log-backups", type=int, default=DEFAULT_BACKUPS,
                    help="rotated files kept per log (default: %(default)s)")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every node and the "
                    "router to come up (default: %(default)s)")
    args, rest = ap.parse_known_args(argv)   # engine flags go to the nodes, the rest to the router
    split = 0 if args.colocated else 1
    for name in ("encoders", "prefills", "decodes"):
        if getattr(args, name) is None:
            setattr(args, name, split)
    return args, rest


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"router not healthy after {timeout_s}s")


def router_processes(cores: int | None = None) -> int:
    """`epd serve`'s router processes unless --api-server-count says: one per 4 of the host's cores,
    1 to 4 (one Python router relaying 16 one-image requests a second saturated, BENCHMARKS.md)."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(4, cores // 4))


def _router_cmd(args: argparse.Namespace, model: str, port: int, router_args: list[str], secret_file: str) -> list[str]:
    cmd = ["--model", model, "--backend", "disagg", "--host", args.host, "--port", str(port),
           "--cluster-secret-file", secret_file, *router_args]
    if not any(a.split("=")[0] in ("--api-server-count", "-asc") for a in router_args):
        cmd += ["--api-server-count", str(router_processes())]
    if not any(a.startswith("--served-model-name") for a in router_args):   # vLLM: --model as given
        cmd += ["--served-model-name", args.model] + ([model, os.path.basename(model)] if model != args.model else [])
    return cmd


def check_before_start(args: argparse.Namespace, model: str, engine_args: list[str],
                       router_args: list[str]) -> RouterSettings:
    """Every option, and the port, checked before anything starts: the router's settings, or
    ValueError / OSError saying what is wrong."""
    from epd.node.runtime import node_parser
    from router.main import build_parser, check_args

    def parse(who: str, parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
        try:
            return parse_or_raise(parser, argv)
        except ValueError as e:
            raise ValueError(f"{who}: {e} (options epd serve does not know go to the router; see epd serve "
                             "--help)") from None

    if not args.colocated and not (args.prefills and args.decodes):
        raise ValueError("nothing would serve: give at least one prefill and one decode node, or --colocated N")
    if min(args.encoders, args.prefills, args.decodes, args.colocated) < 0:
        raise ValueError("node counts must be 0 or more")
    for role in ("encoder", "prefill", "decode", "colocated"):
        parse(f"epd {role}", node_parser(role), ["--model", model, *engine_args, *args.node_args.split()])
    settings = check_args(parse("epd router", build_parser(), _router_cmd(args, model, args.port, router_args, "")))
    if args.port:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
            try:
                probe.bind((args.host, args.port))
            except OSError as e:
                raise ValueError(f"cannot serve on {args.host}:{args.port}: {e.strerror} (another server "
                                 "holds it?)") from None
    return settings


def _is_stats_line(line: bytes) -> bool:
    return b" epd.stats: " in line


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    t0 = time.monotonic()
    try:
        engine_args, router_args = engine_flags(rest)
        model = resolve_model(args.model)
        settings = check_before_start(args, model, engine_args, router_args)
        placements = _placements(args, [*engine_args, *args.node_args.split()])
    except (ValueError, OSError) as e:
        print(f"epd serve: {e}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="epd-logs-")
    redis = None if args.redis_url else PrivateRedis().start()
    redis_url = args.redis_url or redis.url
    node_args = [*engine_args, "--http-port", "0", *args.node_args.split()]   # /health, /metrics: any free port
    cluster = Cluster(model, redis_url, log_dir, device=args.device, common_args=node_args,
                      log_max_bytes=int(args.log_max_mb * (1 << 20)), log_backups=args.log_backups)
    mps: MPSDaemon | None = None
    supervisor: Supervisor | None = None
    stopping = {"flag": False}

    def _stop(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        mps = _start_mps(args, placements)
        cluster.extra_env = mps.env() if mps is not None else {}
        _start_nodes(cluster, args, node_args, placements)
        cluster.wait_ready(timeout_s=args.ready_timeout)
        port = args.port or free_port()
        cmd = [sys.executable, "-m", "epd.cli", "router", *_router_cmd(args, model, port, router_args,
                                                                        cluster.secret_file)]
        supervisor = Supervisor(cluster, redis, lambda: _start_router(cmd, cluster, log_dir))
        url = f"http://{args.host}:{port}"
        _wait_http(url, supervisor.router, args.ready_timeout)
        print(f"EPD ready on {url}/v1 (model {settings.served_model_name}; {_pools(args)}; redis "
              f"{_shown(redis_url)}; started in {time.monotonic() - t0:.1f}s; logs in {log_dir})", flush=True)
        while not stopping["flag"]:
            supervisor.check()   # what dies is started again; the rest keeps serving
            if supervisor.gave_up_on_router:
                return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        print(f"epd serve: {e}", file=sys.stderr)
        return 1
    finally:
        _shut_down(supervisor.router if supervisor is not None else None, cluster, redis)
        if mps is not None:
            mps.stop()


def _placements(args: argparse.Namespace, node_args: list[str]) -> list[Placement] | None:
    """Each node's GPU and memory share (`deploy.gpu_placement`); None on a CPU. ValueError when
    --gpus names GPUs that are not there."""
    if not _on_gpu(args.device):
        if args.gpus:
            raise ValueError("--gpus places nodes on GPUs; there are none here (or --device cpu was given)")
        return None
    import torch

    from epd.node.runtime import node_parser

    visible = torch.cuda.device_count()
    gpus = [int(g) if g.strip().isdigit() else -1 for g in args.gpus.split(",")] if args.gpus else \
        list(range(visible))
    if not gpus or any(not 0 <= g < visible for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {args.gpus}: GPUs 0..{visible - 1} are visible, each given once")
    tp = node_parser("prefill").parse_known_args(["--model", "-", *node_args])[0].tensor_parallel_size
    return place(gpus, _counts(args), tp)


def _counts(args: argparse.Namespace) -> dict[str, int]:
    """Nodes of each role (in `ROLES` order) epd serve starts."""
    return {"encoder": args.encoders, "prefill": args.prefills, "decode": args.decodes, "colocated": args.colocated}


def _start_nodes(cluster: Cluster, args: argparse.Namespace, node_args: list[str],
                 placements: list[Placement] | None) -> None:
    """Every node; on GPUs each on its own (`--device cuda:N`, when more than GPU 0 is used) with
    its share of that GPU's memory (unless the user sized the pools)."""
    if placements is None:
        for role, count in _counts(args).items():
            for _ in range(count):
                cluster.add(role)
        return
    sized = user_sized(node_args)
    one_gpu = {g for p in placements for g in p.gpus} == {0}
    if not sized and one_gpu:
        import torch

        shares = {p.role: p.share for p in placements if p.share is not None}
        print(describe(shares, args.encoders, torch.cuda.get_device_properties(0).total_memory), flush=True)
    elif not one_gpu:
        print(describe_placements(placements), flush=True)
    for p in sorted(placements, key=lambda p: ROLES.index(p.role)):
        extra = [] if one_gpu else ["--device", f"cuda:{p.gpu}"]
        if p.share is not None and not sized:
            extra += ["--gpu-memory-utilization", str(p.share)]
        cluster.add(p.role, extra)


def _pools(args: argparse.Namespace) -> str:
    split = f"{args.encoders}E {args.prefills}P {args.decodes}D" if args.prefills or args.decodes else ""
    colocated = f"{args.colocated} colocated" if args.colocated else ""
    return " + ".join(part for part in (split, colocated) if part)


def _start_mps(args: argparse.Namespace, placements: list[Placement] | None) -> MPSDaemon | None:
    """CUDA MPS when several nodes share a GPU (--mps auto) or when asked (on); None when not used."""
    nodes = args.encoders + args.prefills + args.decodes + args.colocated
    if args.mps == "off" or placements is None or (args.mps == "auto" and not shared_gpus(placements)):
        return None
    mps = MPSDaemon()
    try:
        print(mps.start(), flush=True)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        if args.mps == "on":
            raise RuntimeError(f"--mps on: {e}") from None
        print(f"CUDA MPS not started ({e}): the {nodes} nodes sharing GPUs will take turns on them, which costs "
              "latency under load (see BENCHMARKS.md)", flush=True)
        return None
    return mps


def _on_gpu(device: str | None) -> bool:
    if device is not None:
        return device == "cuda"
    import torch

    return torch.cuda.is_available()


def _start_router(cmd: list[str], cluster: Cluster, log_dir: str) -> subprocess.Popen:
    router = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                              env=cluster.env())
    LogPump(os.path.join(log_dir, "router.log"), cluster.log_max_bytes, cluster.log_backups,
            echo=_is_stats_line).start(router.stdout)
    return router


def _shut_down(router: subprocess.Popen | None, cluster: Cluster, redis: PrivateRedis | None) -> None:
    print("shutting down", flush=True)
    if router is not None and router.poll() is None:
        router.terminate()
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()
    cluster.stop()
    if redis is not None:
        redis.stop()
