"""Measure KVTransport bandwidth between two processes on this host.

    python -m kv_transfer.probe --mib 8 --tensors 4 --messages 16 [--device cuda:0] [--tls tcp]

Lifecycle: the command starts a receiver (this module with ``--serve``) as a child process,
which opens a transport, pre-registers one set of buffers per message on its device and
prints its address; the parent sends `rounds` rounds of `messages` messages of `tensors`
tensors of `mib` MiB each (one after another, or a round at once with ``--concurrent``)
over the same buffers, so only the first round pays for connecting and for UCX memory
registration / CUDA IPC mapping, as in steady serving. It prints one JSON line for the last
round: wall-clock GB/s, and per message GB/s on both sides. Nothing crosses the process
boundary but UCX messages and JSON lines. Use it on a GPU host to check that CUDA tensors
go over cuda_ipc / NVLink (leave ``--tls`` unset).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch

from kv_transfer.transport import KVTransport


def _shape(mib: float) -> tuple[int, int]:
    # [rows, 4096] bf16 rows of 8 KiB
    return max(1, int(mib * 2**20 / (4096 * 2))), 4096


def _options(tls: str | None) -> dict[str, str] | None:
    return {"TLS": tls} if tls else None


def _value(round_: int, index: int) -> float:
    return float((round_ * 37 + index) % 251)  # an integer, exact in bf16


def serve(args: argparse.Namespace) -> None:
    """Child: receive every round into the same pre-registered buffers; report the last round."""
    with KVTransport(args.host, device=args.device, ucx_options=_options(args.tls)) as t:
        buffers = [
            [torch.empty(_shape(args.mib), dtype=torch.bfloat16, device=args.device) for _ in range(args.tensors)]
            for _ in range(args.messages)
        ]
        for r in range(args.rounds):
            for i, bufs in enumerate(buffers):
                t.expect(f"probe:{r}:{i}", bufs)
        print(json.dumps({"address": t.address}), flush=True)
        last = args.rounds - 1
        per_message = []
        for r in range(args.rounds):
            for i in range(args.messages):
                msg = t.wait(f"probe:{r}:{i}", timeout=120)
                per_message.append(msg.nbytes / msg.seconds / 1e9)
        for i, bufs in enumerate(buffers):  # only the last round's bytes are still there
            if not all(bool((b == _value(last, i)).all()) for b in bufs):
                raise SystemExit(f"message {i} of the last round arrived with wrong content")
        print(json.dumps({"recv_gbps": per_message[-args.messages :]}), flush=True)


def _child_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "kv_transfer.probe", "--serve", "--host", args.host, "--device", args.recv_device]
    cmd += ["--mib", str(args.mib), "--tensors", str(args.tensors), "--messages", str(args.messages)]
    cmd += ["--rounds", str(args.rounds)] + (["--tls", args.tls] if args.tls else [])
    return cmd


def read_json_line(child: subprocess.Popen[str]) -> dict[str, Any]:
    """Next JSON line of a child process; other lines (UCX diagnostics) are passed to stderr."""
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("{"):
            return json.loads(line)
        sys.stderr.write(line)
    raise RuntimeError(f"receiver exited with {child.wait()}")


def reap(child: subprocess.Popen[str]) -> None:
    """Let a child probe process exit; kill it if it has not within 30 s."""
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()


def _send_round(t: KVTransport, address: str, data: list[list[torch.Tensor]], round_: int, concurrent: bool) -> list:
    for i, tensors in enumerate(data):
        for x in tensors:
            x.fill_(_value(round_, i))
    if concurrent:
        futures = [t.send(address, f"probe:{round_}:{i}", d) for i, d in enumerate(data)]
        return [f.result(timeout=120) for f in futures]
    return [t.send(address, f"probe:{round_}:{i}", d).result(timeout=120) for i, d in enumerate(data)]


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Parent: start the receiver, send every round, time the last one."""
    child = subprocess.Popen(_child_command(args), stdout=subprocess.PIPE, text=True)
    try:
        address = read_json_line(child)["address"]
        with KVTransport(args.host, device=args.device, ucx_options=_options(args.tls)) as t:
            data = [
                [torch.empty(_shape(args.mib), dtype=torch.bfloat16, device=args.device) for _ in range(args.tensors)]
                for _ in range(args.messages)
            ]
            for r in range(args.rounds - 1):  # warm-up: connection, UCX registration / IPC caches
                _send_round(t, address, data, r, args.concurrent)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize(args.device)
            start = time.perf_counter()
            reports = _send_round(t, address, data, args.rounds - 1, args.concurrent)
            wall = time.perf_counter() - start
            recv = read_json_line(child)
        total = sum(r.nbytes for r in reports)
        return {
            "device": f"{args.device}->{args.recv_device}",
            "tls": args.tls or "auto",
            "message_mib": args.mib * args.tensors,
            "messages": args.messages,
            "concurrent": args.concurrent,
            "total_mib": total / 2**20,
            "wall_gbps": total / wall / 1e9,
            "send_gbps": [round(r.gbps, 3) for r in reports],
            "recv_gbps": [round(g, 3) for g in recv["recv_gbps"]],
        }
    finally:
        reap(child)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=float, default=8.0, help="MiB per tensor")
    parser.add_argument("--tensors", type=int, default=4, help="tensors per message (layer groups)")
    parser.add_argument("--messages", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="sender tensors' device")
    parser.add_argument("--recv-device", default=None, help="receiver buffers' device (default: --device)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls", default=None, help="UCX_TLS, e.g. tcp (default: let UCX choose)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the same buffers; the last is timed")
    parser.add_argument("--concurrent", action="store_true", help="all messages in flight at once")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.recv_device = args.recv_device or args.device
    if args.serve:
        serve(args)
    else:
        print(json.dumps(probe(args)))


if __name__ == "__main__":
    main()
