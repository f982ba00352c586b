"""Measure KVTransport's one-way latency between two processes on this host: ping-pong.

    python -m kv_transfer.latency_probe [--mib 0] [--device cpu|cuda:0] [--progress thread]
                                        [--wait block|poller|spin] [--pings 200]

The parent starts an echo child (this module with ``--serve``) and sends `pings` messages one
after another, each answered by the child before the next goes: a header-only message with
``--mib 0`` (what the prefill node's `{rid}:meta` is), else one tensor of that many MiB (4.7 MiB
is one 1280x720 image's embeddings on the 3b preset) that the child answers header-only. Both
sides wait the way `--wait` says: ``block`` sleeps in `KVTransport.wait` (the GIL is free),
``poller`` sleeps in a zmq poll on the transport's wake-up pipe as a node's idle loop does, and
``spin`` polls without sleeping, as a node's loop does while it has work (it holds the GIL but
for Python's switch interval, `--switch-interval`, as `run_node` sets it). It prints one JSON line: the
median, 10th and 90th percentile of half the round trip in ms, after `warmup` pings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import zmq

from kv_transfer.probe import read_json_line, reap
from kv_transfer.transport import SWITCH_INTERVAL_S, KVTransport, Message


def _await(t: KVTransport, key: str, how: str, poller: zmq.Poller | None) -> Message:
    if how == "block":
        return t.wait(key, timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = t.poll(key)
        if msg is not None:
            return msg
        if poller is not None and poller.poll(5):
            t.drain_wakeups()
    raise TimeoutError(f"{key} did not come within 30 s")


def _transport(args: argparse.Namespace) -> tuple[KVTransport, zmq.Poller | None]:
    t = KVTransport(args.host, device=args.device, progress_mode=args.progress)
    poller = None
    if args.wait == "poller":
        poller = zmq.Poller()
        poller.register(t.wakeup_fd, zmq.POLLIN)
    return t, poller


def _payload(args: argparse.Namespace) -> list[torch.Tensor]:
    if args.mib <= 0:
        return []
    return [torch.ones(int(args.mib * 2**20 / 2), dtype=torch.bfloat16, device=args.device)]


def serve(args: argparse.Namespace) -> None:
    """Child: answer ping i with pong i (header only)."""
    sys.setswitchinterval(args.switch_interval)
    t, poller = _transport(args)
    with t:
        print(json.dumps({"address": t.address}), flush=True)
        peer = json.loads(sys.stdin.readline())["address"]   # the parent's, once it listens
        for i in range(args.warmup + args.pings):
            _await(t, f"ping:{i}", args.wait, poller)
            t.send(peer, f"pong:{i}", [])
        time.sleep(0.5)   # let the last pong leave before the transport closes


def _child_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "kv_transfer.latency_probe", "--serve", "--host", args.host, "--device", args.device,
            "--progress", args.progress, "--wait", args.wait, "--pings", str(args.pings),
            "--warmup", str(args.warmup), "--mib", str(args.mib), "--switch-interval", str(args.switch_interval)]


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Parent: ping the child `warmup + pings` times; half of each timed round trip, in ms."""
    sys.setswitchinterval(args.switch_interval)
    child = subprocess.Popen(_child_command(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None
    try:
        address = read_json_line(child)["address"]
        t, poller = _transport(args)
        with t:
            child.stdin.write(json.dumps({"address": t.address}) + "\n")
            child.stdin.flush()
            payload = _payload(args)
            halves = []
            for i in range(args.warmup + args.pings):
                start = time.perf_counter()
                t.send(address, f"ping:{i}", payload)
                _await(t, f"pong:{i}", args.wait, poller)
                if i >= args.warmup:
                    halves.append((time.perf_counter() - start) / 2 * 1e3)
        deciles = statistics.quantiles(halves, n=10)
        return {"device": args.device, "progress": args.progress, "wait": args.wait, "ping_mib": args.mib,
                "switch_interval_ms": args.switch_interval * 1e3,
                "pings": len(halves), "one_way_ms_median": round(statistics.median(halves), 3),
                "one_way_ms_p10": round(deciles[0], 3), "one_way_ms_p90": round(deciles[-1], 3)}
    finally:
        reap(child)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=float, default=0.0, help="MiB of the ping's one tensor; 0 = header only")
    parser.add_argument("--device", default="cpu", help="the ping tensor's device, and where the child lands it")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--progress", default="thread", choices=["thread", "thread-polling"])
    parser.add_argument("--wait", default="poller", choices=["block", "poller", "spin"])
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--switch-interval", type=float, default=SWITCH_INTERVAL_S,
                        help="sys.setswitchinterval on both sides (default: what run_node sets)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args)
    else:
        print(json.dumps(probe(args)), flush=True)


if __name__ == "__main__":
    main()
