"""TTFT colocated vs disaggregated on one GPU (BENCHMARKS.md item 5a).

    python -m bench.gpu_disagg_ttft --model DIR --out ttft.json [--requests 20] [--variant '--no-kv-ipc' ...]

Both setups run at once on the same GPU: a colocated server (`epd router --backend local`: one
process runs the vision tower, prefill and decode in its engine steps) and `epd serve` with
1 encoder + 1 prefill + 1 decode process behind its router (encoder -> embeddings over UCX ->
prefill -> KV over UCX -> decode), one more `epd serve` per `--variant`. Requests go one at a
time, interleaved: round i sends the same image to each setup in turn (the order rotating), so
drift of the host (its image preprocessing varied 33-47 ms between runs on one H200 host) falls
on both alike and each round is a paired comparison (`ratio_paired_median`, beside the ratio of
the medians). Each request is one 1280x720 JPEG (`--image-size`) (a different random image each round, so no
embedding cache hits) as a data URI plus `--text-tokens` tokens of text, `stream: true`.
TTFT = request sent -> first chunk carrying content, on the client, over one kept-alive HTTP
client per setup (as an API user holds; until 2026-11-29 each request built a new httpx client,
whose start-up, 20-50 ms, was counted in both setups' TTFT); the server's per-stage
timings (`epd_timings` in the final chunk) are kept beside it. Warm-up rounds (flashinfer JIT,
CUDA graphs, UCX connections) are not counted.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
from PIL import Image
from transformers import AutoTokenizer

from bench.report import write_json
from deploy.redis_proc import free_port

MODEL_NAME = "bench"


def image_data_uri(seed: int, width: int = 1280, height: int = 720) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def text_of_tokens(model: str, n: int) -> str:
    """Text that the checkpoint's tokenizer turns into exactly `n` tokens."""
    tok = AutoTokenizer.from_pretrained(model)
    words = " ".join(f"item{i} is blue" for i in range(4 * n))
    return tok.decode(tok(words, add_special_tokens=False)["input_ids"][:n])


def one_request(client: httpx.Client, url: str, text: str, image: str, max_tokens: int) -> dict[str, Any]:
    """One streamed request on `client`, a kept-alive client as an API user holds (a new httpx client
    each request adds its own start-up, ~20-50 ms of loading CA certificates, to the TTFT)."""
    body = {"model": MODEL_NAME, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                       {"type": "text", "text": text}]}]}
    sent = time.perf_counter()
    ttft, last = None, {}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:500]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                ttft = (time.perf_counter() - sent) * 1e3
            last = chunk
    usage = last.get("usage") or {}
    return {"ttft_ms": ttft, "prompt_tokens": usage.get("prompt_tokens"),
            "image_tokens": (last.get("epd_prompt_tokens") or {}).get("image_tokens"),
            "server": last.get("epd_timings", {})}


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Server:
    """One server setup (a colocated router, or `epd serve` with its node processes) on its own port."""

    def __init__(self, name: str, cmd: list[str], port: int, log_dir: str) -> None:
        self.name, self.url, self.results = name, f"http://127.0.0.1:{port}", []
        self.cmd, self.log_dir = cmd, log_dir
        self.proc: subprocess.Popen | None = None
        self.ready_s = 0.0

    def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self._log = open(os.path.join(self.log_dir, f"{self.name}.log"), "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        self.ready_s = _wait_ready(self.url, self.proc, timeout_s)
        print(f"[{self.name}] ready after {self.ready_s:.1f}s", flush=True)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self._log.close()
            self.proc = None


def measure_interleaved(servers: list[Server], args: argparse.Namespace, text: str) -> None:
    """Round i sends the same image (seed i) to every setup, one request at a time, the setups' order
    rotating each round: host drift (CPU clocks, page cache, neighbours) falls on all of them alike,
    and each round gives a paired comparison. Each setup has its own kept-alive HTTP client."""
    clients = {server.name: httpx.Client(trust_env=False) for server in servers}
    try:
        _rounds(servers, clients, args, text)
    finally:
        for client in clients.values():
            client.close()


def _rounds(servers: list[Server], clients: dict[str, httpx.Client], args: argparse.Namespace, text: str) -> None:
    width, height = (int(x) for x in args.image_size.lower().split("x"))
    for i in range(args.warmup + args.requests):
        image = image_data_uri(i, width, height)
        order = servers[i % len(servers):] + servers[:i % len(servers)]
        for server in order:
            t0 = time.perf_counter()
            r = one_request(clients[server.name], server.url, text, image, args.max_tokens)
            print(f"[{server.name}] request {i}: ttft {r['ttft_ms']:.1f} ms (wall {time.perf_counter() - t0:.1f}s) "
                  f"server {r['server']}", flush=True)
            if i >= args.warmup:
                server.results.append(r)


def summarize(results: list[dict[str, Any]], ready_s: float) -> dict[str, Any]:
    ttfts = sorted(r["ttft_ms"] for r in results)
    stages = sorted({k for r in results for k, v in r["server"].items() if v is not None})
    return {"requests": len(results), "ready_s": round(ready_s, 1),
            "prompt_tokens": results[0]["prompt_tokens"], "image_tokens": results[0]["image_tokens"],
            "median_ttft_ms": round(statistics.median(ttfts), 2), "mean_ttft_ms": round(statistics.mean(ttfts), 2),
            "min_ttft_ms": round(ttfts[0], 2), "max_ttft_ms": round(ttfts[-1], 2),
            "ttft_ms_all": [round(x, 2) for x in ttfts],
            "median_server_ms": {k: round(statistics.median([r["server"].get(k) or 0.0 for r in results]), 2)
                                 for k in stages}}


def _report(args: argparse.Namespace, servers: list[Server]) -> dict[str, Any]:
    colocated = summarize(servers[0].results, servers[0].ready_s)
    report: dict[str, Any] = {"model": args.model, "text_tokens": args.text_tokens,
                              "image": f"{args.image_size} JPEG, random pixels", "interleaved": not args.one_at_a_time,
                              "colocated": colocated}
    for variant, server in zip(args.variant or [""], servers[1:], strict=True):
        disagg = summarize(server.results, server.ready_s)
        disagg["node_args"] = variant
        paired = [d["ttft_ms"] / c["ttft_ms"] for d, c in zip(server.results, servers[0].results, strict=True)]
        report.setdefault("disaggregated", []).append(disagg)
        report.setdefault("ratio_median", []).append(round(disagg["median_ttft_ms"] / colocated["median_ttft_ms"], 3))
        report.setdefault("ratio_paired_median", []).append(round(statistics.median(paired), 3))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--kv-cache-tokens", type=int, default=32768, help="per process, so three fit on one GPU")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--variant", action="append", default=None,
                    help="extra node arguments of one disaggregated run, e.g. '--layer-group-size 4' or "
                         "'--no-kv-ipc'; repeat for several runs (default: one run with the defaults)")
    ap.add_argument("--image-size", default="1280x720", help="WIDTH x HEIGHT of each request's JPEG")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="run the setups one after the other instead of side by side (a model whose colocated "
                         "and split setups do not fit the GPU together: the 11b preset on 80 GB)")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    text = text_of_tokens(args.model, args.text_tokens)
    py = [sys.executable, "-m", "epd.cli"]

    def common(port: int) -> list[str]:
        return ["--model", args.model, "--port", str(port), "--served-model-name", MODEL_NAME]

    ports: list[int] = []

    def new_port() -> int:   # distinct even though none is bound yet
        while (port := free_port()) in ports:
            pass
        ports.append(port)
        return port

    port = new_port()
    servers = [Server("colocated", py + ["router", "--backend", "local", "--device", args.device,
                                         "--kv-cache-tokens", str(args.kv_cache_tokens), *common(port)],
                      port, args.log_dir)]
    for i, variant in enumerate(args.variant or [""]):
        port = new_port()
        node_args = f"--kv-cache-tokens {args.kv_cache_tokens} {variant}".strip()
        servers.append(Server(f"disaggregated-{i}", py + ["serve", "--device", args.device, "--log-dir",
                                                          os.path.join(args.log_dir, f"disaggregated-{i}"),
                                                          "--node-args", node_args, *common(port)],
                              port, args.log_dir))
    try:
        if args.one_at_a_time:   # each alone on the GPU: the same images, one setup after the other
            for server in servers:
                server.start()
                server.wait_ready(args.ready_timeout)
                measure_interleaved([server], args, text)
                server.stop()
        else:
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready(args.ready_timeout)
            measure_interleaved(servers, args, text)
    finally:
        for server in servers:
            server.stop()
    report = _report(args, servers)
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
