"""TTFT colocated vs disaggregated on one GPU (BENCHMARKS.md item 5a).

    python -m bench.gpu_disagg_ttft --model DIR --out ttft.json [--requests 20] [--variant '--no-kv-ipc' ...]

The same request stream goes first to a colocated server (`epd router --backend local`: one
process runs the vision tower, prefill and decode in its engine steps), then to `epd serve`
with 1 encoder + 1 prefill + 1 decode process on the same GPU behind the router (encoder ->
embeddings over UCX -> prefill -> KV over UCX -> decode). Each request is one 1280x720 JPEG
(a different random image each time, so the encoder's embedding cache never hits) as a data
URI plus `--text-tokens` tokens of text, `stream: true`, sent one at a time. TTFT = request
sent -> first chunk carrying content, on the client; the server's per-stage timings
(`epd_timings` in the final chunk) are kept beside it. Warm-up requests (flashinfer JIT,
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


def one_request(url: str, text: str, image: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                       {"type": "text", "text": text}]}]}
    sent = time.perf_counter()
    ttft, last = None, {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as resp:
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
            "image_tokens": (usage.get("prompt_tokens_details") or {}).get("image_tokens"),
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


def measure(name: str, cmd: list[str], url: str, args: argparse.Namespace, text: str,
            image_seed: int = 0) -> dict[str, Any]:
    os.makedirs(args.log_dir, exist_ok=True)
    log_path = os.path.join(args.log_dir, f"{name}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready_s = _wait_ready(url, proc, args.ready_timeout)
            print(f"[{name}] ready after {ready_s:.1f}s", flush=True)
            results = []
            for i in range(args.warmup + args.requests):
                t0 = time.perf_counter()
                r = one_request(url, text, image_data_uri(image_seed + i), args.max_tokens)
                print(f"[{name}] request {i}: ttft {r['ttft_ms']:.1f} ms (wall {time.perf_counter() - t0:.1f}s) "
                      f"server {r['server']}", flush=True)
                if i >= args.warmup:
                    results.append(r)
        finally:
            _stop(proc)
    return summarize(results, ready_s)


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
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    text = text_of_tokens(args.model, args.text_tokens)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    py = [sys.executable, "-m", "epd.cli"]
    common = ["--model", args.model, "--port", str(port), "--served-model-name", MODEL_NAME]
    colocated = measure("colocated", py + ["router", "--backend", "local", "--device", args.device, "--kv-cache-tokens",
                                           str(args.kv_cache_tokens), *common], url, args, text)
    report: dict[str, Any] = {"model": args.model, "text_tokens": args.text_tokens,
                              "image": "1280x720 JPEG, random pixels", "colocated": colocated}
    for i, variant in enumerate(args.variant or [""]):
        node_args = f"--kv-cache-tokens {args.kv_cache_tokens} {variant}".strip()
        disagg = measure(f"disaggregated-{i}", py + ["serve", "--device", args.device, "--log-dir",
                                                      args.log_dir, "--node-args", node_args, *common],
                         url, args, text, image_seed=1000 * (i + 1))
        disagg["node_args"] = variant
        report.setdefault("disaggregated", []).append(disagg)
        report.setdefault("ratio_median", []).append(round(disagg["median_ttft_ms"] / colocated["median_ttft_ms"], 3))
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
