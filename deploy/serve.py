"""`epd serve`: the whole system on one machine with one command.

    epd serve --model DIR|tiny-random [--encoders N --prefills N --decodes N] [--port 8000]
              [--host 127.0.0.1] [--redis-url URL] [--device cpu|cuda] [engine flags, given to
              every node: --max-model-len N --dtype ...] [router options...]

Lifecycle: resolve the model (`tiny-random` / `tiny-random-ARCH` builds a tiny checkpoint into
~/.cache/epd once) -> start a private Redis unless --redis-url is given -> start the node
processes and wait until each has registered -> start the router and wait for /health ->
print the URL -> on Ctrl-C / SIGTERM stop the router, the nodes, then Redis (children also
die with this process, so none are orphaned).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from deploy.procs import Cluster, die_with_parent
from deploy.redis_proc import PrivateRedis, free_port
from epd.engine.engine_args import engine_flags

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
    ap = argparse.ArgumentParser(prog="epd serve", description="run router + encoder/prefill/decode pools locally")
    ap.add_argument("--model", required=True, help="HF checkpoint directory, or tiny-random (Qwen2.5-VL) / "
                    "tiny-random-ARCH (a tiny random checkpoint of any supported architecture)")
    ap.add_argument("--encoders", type=int, default=1)
    ap.add_argument("--prefills", type=int, default=1)
    ap.add_argument("--decodes", type=int, default=1)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--redis-url", default=None, help="default: start a private redis-server")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--node-args", default="", help="extra arguments for every node, as one string")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    return ap.parse_known_args(argv)   # engine flags go to the nodes, the rest to the router


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


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    engine_args, router_args = engine_flags(rest)
    t0 = time.monotonic()
    try:
        model = resolve_model(args.model)
    except ValueError as e:
        print(f"epd serve: {e}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="epd-logs-")
    redis = None if args.redis_url else PrivateRedis().start()
    redis_url = args.redis_url or redis.url
    cluster = Cluster(model, redis_url, log_dir, device=args.device, common_args=engine_args + args.node_args.split())
    router: subprocess.Popen | None = None
    stopping = {"flag": False}

    def _stop(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        for role, count in (("encoder", args.encoders), ("prefill", args.prefills), ("decode", args.decodes)):
            for _ in range(count):
                cluster.add(role)
        cluster.wait_ready(timeout_s=args.ready_timeout)
        port = args.port or free_port()
        cmd = [sys.executable, "-m", "epd.cli", "router", "--model", model,
               "--backend", "disagg", "--host", args.host, "--port", str(port),
               "--cluster-secret-file", cluster.secret_file, *router_args]
        if "--served-model-name" not in router_args:   # vLLM's default: --model as the user gave it
            cmd += ["--served-model-name", args.model] + ([os.path.basename(model)] if model != args.model else [])
        router_log = open(os.path.join(log_dir, "router.log"), "wb")  # noqa: SIM115 - lives as long as the router
        router = subprocess.Popen(cmd, stdout=router_log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                  env=cluster.env())
        url = f"http://{args.host}:{port}"
        _wait_http(url, router, args.ready_timeout)
        print(f"EPD ready on {url}/v1 (model {os.path.basename(model)}; {args.encoders}E {args.prefills}P "
              f"{args.decodes}D; redis {_shown(redis_url)}; started in {time.monotonic() - t0:.1f}s; "
              f"logs in {log_dir})", flush=True)
        while not stopping["flag"]:
            if router.poll() is not None or any(not n.alive() for n in cluster.nodes):
                print("a process exited; shutting down (see logs in " + log_dir + ")", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        print(f"epd serve: {e}", file=sys.stderr)
        return 1
    finally:
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
