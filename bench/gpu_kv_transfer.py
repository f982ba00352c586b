"""KV transfer prefill -> decode over UCX between two processes on one GPU (BENCHMARKS.md item 4).

    python -m bench.gpu_kv_transfer --preset 7b --tokens 1024,4096,16384 [--ipc] --out kv.json

What one transfer is here, the same path the nodes take: the sender ("prefill") holds a
request's KV scattered over a paged pool of the preset's layout; for each layer group it
gathers the request's tokens into one wire tensor (`gather_kv`) and sends it (`KVTransport`);
the receiver ("decode", a second process on the same GPU) takes each group as it lands and
scatters it into its own pages (`scatter_kv`). Time = first gather started (sender) -> last
scatter finished on the GPU (receiver), both read from CLOCK_MONOTONIC, which the two
processes share. GB/s = the request's KV bytes / that time. The receiver checks that its
pages hold exactly the sender's values. Rounds 0..warmup-1 pay for connecting and for CUDA IPC
mapping and are not counted; the median of the rest is reported.

With ``--ipc``, the same-host path instead (kv_transfer/cuda_ipc.py), as the nodes run it: the
receiver ("decode") reserves pages and sends their ids with its pool's CUDA IPC handles (mapped
once by the sender); the sender ("prefill") writes the request's pages straight into the
receiver's with one kernel, waits for it, then sends the small message that completes the
hand-over. Rounds alternate between two ways of starting the write:
- alone: the GPU idle, the host stages the page ids and launches the kernel, then waits. Time =
  write started -> the write finished on the GPU (`transfer_ms`: the bytes are in the receiver's
  pages), and -> that message taken by the receiver (`notified_ms`);
- queued, as the prefill node runs it (`_queue_write`, behind the last layer): the GPU is still
  busy with work standing in for the prefill's last layers (~0.5 ms) when the host queues the
  write, so staging and launch happen meanwhile. Time = the KV ready on the GPU (an event after
  that work) -> the write finished (an event after it): `queued_ms`, the time the hand-over adds
  to the request; `queued_notified_ms` = the KV ready -> the message taken by the receiver.

Alongside, in the same processes: the gather and scatter kernels alone, or the page-copy kernel
alone (CUDA events), and a device-to-device copy of the same bytes, which is the ceiling a
transfer could reach.
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

from bench.device_timing import median_ms
from bench.report import write_json
from epd.models import preset_text_dims
from kv_transfer.cuda_ipc import PageWriter, PoolImports, export_pool
from kv_transfer.kv_codec import gather_kv, layer_groups, scatter_kv
from kv_transfer.probe import read_json_line
from kv_transfer.transport import KVTransport

PAGE_SIZE = 16
ARCH = "qwen2_5_vl"   # whose presets' KV shapes are measured


class PagedKV:
    """A preset's paged KV pool on one device, and one request's page table in it."""

    def __init__(self, preset: str, max_tokens: int, device: str, seed: int) -> None:
        dims = preset_text_dims(ARCH, preset)
        self.num_layers = dims["num_hidden_layers"]
        self.kv_heads = dims["num_key_value_heads"]
        self.head_dim = dims["hidden_size"] // dims["num_attention_heads"]
        num_pages = max_tokens // PAGE_SIZE * 5 // 4 + 1
        gen = torch.Generator(device=device).manual_seed(seed)
        self.layers = [torch.randn(num_pages, 2, PAGE_SIZE, self.kv_heads, self.head_dim, generator=gen,
                                   device=device).to(torch.bfloat16) for _ in range(self.num_layers)]
        self.order = torch.randperm(num_pages, generator=gen, device=device)   # scattered, like a busy pool

    def pages(self, num_tokens: int) -> torch.Tensor:
        return self.order[: -(-num_tokens // PAGE_SIZE)]

    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.kv_heads * self.head_dim * 2

    def checksum(self, num_tokens: int) -> float:
        """Sum of the request's K and V values over every layer (float64), page order independent."""
        pages = self.pages(num_tokens)
        return sum(float(gather_kv([layer], pages, num_tokens).double().sum()) for layer in self.layers)


def _key(tokens: int, round_: int, group: int | str) -> str:
    return f"kv:{tokens}:{round_}:{group}"


def receive(args: argparse.Namespace) -> None:
    """Child ("decode"): land every transfer in its own pages and report when each finished."""
    sizes = [int(x) for x in args.tokens.split(",")]
    kv = PagedKV(args.preset, max(sizes), args.device, seed=1)
    groups = layer_groups(kv.num_layers, args.group_size)
    pool = export_pool(kv.layers) if args.ipc else {}
    with KVTransport(args.host, device=args.device, progress_mode=args.ucx_progress) as t:
        print(json.dumps({"address": t.address}), flush=True)
        for tokens in sizes:
            for r in range(args.rounds):
                pages = kv.pages(tokens)
                if args.ipc:   # the decode node's path: offer our pages, wait until prefill wrote them
                    want = t.wait(_key(tokens, r, "want"), timeout=120)
                    t.send(want.peer, _key(tokens, r, "dst"), [], meta={"pool": pool, "pages": pages.tolist()})
                    t.wait(_key(tokens, r, "meta"), timeout=120)
                for gi, group in enumerate([] if args.ipc else groups):
                    msg = t.wait(_key(tokens, r, gi), timeout=120)
                    scatter_kv(msg.tensors[0], kv.layers[group.start:group.stop], pages)
                _sync()
                landed = time.monotonic()
                print(json.dumps({"tokens": tokens, "round": r, "landed": landed,
                                  "checksum": kv.checksum(tokens)}), flush=True)
        print(json.dumps({"scatter_ms": {n: 0.0 if args.ipc else _scatter_ms(kv, groups, n) for n in sizes}}),
              flush=True)


def _scatter_ms(kv: PagedKV, groups: list[range], tokens: int) -> float:
    """The receiver's scatter kernels alone, for one request of `tokens`."""
    pages = kv.pages(tokens)
    wires = [gather_kv(kv.layers[g.start:g.stop], pages, tokens) for g in groups]
    pairs = list(zip(wires, groups, strict=True))
    return median_ms(lambda: [scatter_kv(w, kv.layers[g.start:g.stop], pages) for w, g in pairs])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _send_one(t: KVTransport, address: str, kv: PagedKV, groups: list[range], tokens: int, round_: int) -> float:
    """Gather and send every group of one request; returns the monotonic start time."""
    _sync()
    started = time.monotonic()
    pages = kv.pages(tokens)
    futures = []
    for gi, group in enumerate(groups):
        wire = gather_kv(kv.layers[group.start:group.stop], pages, tokens)
        futures.append(t.send(address, _key(tokens, round_, gi), [wire], meta={"group": gi}))
    for f in futures:
        f.result(timeout=120)
    return started


def _send_one_ipc(t: KVTransport, address: str, kv: PagedKV, imports: PoolImports, tokens: int,
                  round_: int, queued: bool) -> tuple[float, float]:
    """The prefill node's CUDA IPC hand-over: write into the pages decode offered, then tell it.
    Returns the monotonic times the KV was ready (alone: the write started) and written."""
    t.send(address, _key(tokens, round_, "want"), []).result(timeout=120)
    dst = t.wait(_key(tokens, round_, "dst"), timeout=120)
    writer = imports.writer(dst.meta["pool"], kv.layers)   # maps the pool on first use
    src_pages = kv.pages(tokens).tolist()
    _sync()
    if queued:
        torch.cuda._sleep(1_000_000)   # ~0.5 ms: the prefill's last layers, still on the GPU
        ready, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ready.record()
        writer.copy(src_pages, dst.meta["pages"])
        done.record()
        done.synchronize()
        written = time.monotonic()
        started = written - ready.elapsed_time(done) / 1e3
    else:
        started = time.monotonic()
        writer.write(src_pages, dst.meta["pages"])
        written = time.monotonic()
    t.send(address, _key(tokens, round_, "meta"), [], meta={"first_token": 0}).result(timeout=120)
    return started, written


def copy_ms(nbytes: int, device: str) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), repeats=10)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(x) for x in args.tokens.split(",")]
    cmd = [sys.executable, "-m", "bench.gpu_kv_transfer", "--receive", "--preset", args.preset, "--tokens",
           args.tokens, "--rounds", str(args.rounds), "--group-size", str(args.group_size), "--device", args.device,
           "--ucx-progress", args.ucx_progress, *(["--ipc"] if args.ipc else [])]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    kv = PagedKV(args.preset, max(sizes), args.device, seed=0)
    groups = layer_groups(kv.num_layers, args.group_size)
    imports = PoolImports(args.device) if args.ipc else None
    rows = []
    try:
        address = read_json_line(child)["address"]
        with KVTransport(args.host, device=args.device, progress_mode=args.ucx_progress) as t:
            for tokens in sizes:
                ms, notified = {False: [], True: []}, {False: [], True: []}
                for r in range(args.rounds):
                    queued = args.ipc and r % 2 == 1
                    if args.ipc:
                        started, written = _send_one_ipc(t, address, kv, imports, tokens, r, queued)
                    else:
                        started, written = _send_one(t, address, kv, groups, tokens, r), None
                    landed = read_json_line(child)
                    if abs(landed["checksum"] - kv.checksum(tokens)) > 1e-6 * max(1.0, abs(landed["checksum"])):
                        raise SystemExit(f"{tokens} tokens round {r}: the receiver's pages differ from the sender's")
                    if r >= args.warmup:
                        ms[queued].append(((written or landed["landed"]) - started) * 1e3)
                        notified[queued].append((landed["landed"] - started) * 1e3)
                rows.append(_row(kv, groups, tokens, ms[False], args.device, args.ipc))
                if args.ipc:
                    queued_ms = statistics.median(ms[True])
                    rows[-1].update(notified_ms=round(statistics.median(notified[False]), 3),
                                    queued_ms=round(queued_ms, 3),
                                    queued_ms_all=[round(x, 3) for x in ms[True]],
                                    queued_fraction_of_copy=round(rows[-1]["copy_ms"] / queued_ms, 3),
                                    queued_notified_ms=round(statistics.median(notified[True]), 3))
        scatter = read_json_line(child)["scatter_ms"]
    finally:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
    for row in rows:
        row["scatter_ms"] = round(scatter[str(row["tokens"])], 3)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"preset": args.preset, "layer_group_size": args.group_size, "page_size": PAGE_SIZE,
            "rounds_timed": args.rounds - args.warmup, "ipc": args.ipc, "device": device, "rows": rows}


def _row(kv: PagedKV, groups: list[range], tokens: int, ms: list[float], device: str, ipc: bool) -> dict[str, Any]:
    nbytes = kv.bytes_per_token() * tokens
    pages = kv.pages(tokens)
    split = {}
    if ipc:   # "gather" = the page-copy kernel alone, into a second pool of the same shape
        writer = PageWriter(kv.layers, [torch.empty_like(layer) for layer in kv.layers])
        page_list = pages.tolist()
        gather = median_ms(lambda: writer.copy(page_list, page_list))
        split = _write_split(writer, page_list)
        del writer
    else:
        gather = median_ms(lambda: [gather_kv(kv.layers[g.start:g.stop], pages, tokens) for g in groups])
    copy = copy_ms(nbytes, device)
    median = statistics.median(ms)
    return {"tokens": tokens, "kv_bytes": nbytes, "messages": 1 if ipc else len(groups),
            "transfer_ms": round(median, 3),
            "transfer_ms_all": [round(x, 3) for x in ms], "gbps": round(nbytes / median / 1e6, 1),
            "page_copy_ms" if ipc else "gather_ms": round(gather, 3), "copy_ms": round(copy, 3),
            "copy_gbps": round(nbytes / copy / 1e6, 1),
            "fraction_of_copy": round(copy / median, 3), **split}


def _write_split(writer: PageWriter, pages: list[int], repeats: int = 7) -> dict[str, float]:
    """Where a CUDA IPC write's time goes: the host's part (staging the page ids and launching,
    perf_counter), the device's part (the ids' copy and the kernel, CUDA events with the GPU kept
    busy beforehand so host time is hidden) and the whole `write` (launch, run, wait)."""
    host, device, whole = [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        writer.copy(pages, pages)
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)   # ~1 ms of GPU work: the launch below is queued behind it
        start.record()
        writer.copy(pages, pages)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        writer.write(pages, pages)
        whole.append((time.perf_counter() - t0) * 1e3)
    return {"write_host_ms": round(statistics.median(host), 3), "write_device_ms": round(statistics.median(device), 3),
            "write_ms": round(statistics.median(whole), 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="7b", choices=["tiny", "3b", "7b"])
    ap.add_argument("--tokens", default="1024,4096,16384", help="prompt lengths, comma-separated")
    ap.add_argument("--group-size", type=int, default=4, help="layers per message (the nodes' default)")
    ap.add_argument("--rounds", type=int, default=14, help="with --ipc, alternately alone and queued")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ucx-progress", default="thread", choices=["thread", "thread-polling"],
                    help="ucxx progress thread (the nodes' --ucx-progress)")
    ap.add_argument("--ipc", action="store_true",
                    help="the same-host path: prefill writes the pages into decode's pool through CUDA IPC")
    ap.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.receive:
        receive(args)
        return
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
