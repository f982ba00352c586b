"""The router's front for one image request, phase by phase, and under concurrent threads.

    python3 -m bench.router_front [--images 4] [--resolution 1280x720] [--text-tokens 128]
        [--threads 1,2,4] [--requests 64] [--mode decode,header] [--model DIR] [--json PATH]

The workload: a chat request whose body holds `--images` JPEG data URIs (quality 90, a gradient
with noise, so they are the size of a photograph) and about `--text-tokens` tokens of text. Each
request goes through the router's own functions, in the order the router runs them:
  json      orjson.loads of the body + ChatCompletionRequest validation (router.app's parse)
  render    the chat template (PromptBuilder._render)
  base64    each data URI to bytes (epd.media.loading._read_source)
  image     `decode`: open, header checks, full decode, EXIF transpose, RGB (what the router did:
            loading._decode); `header`: the header only, size with EXIF orientation (what it does
            now: epd.media.encoded.probe_bytes)
  tokenize  tokenize + image layouts + placeholder expansion (PromptBuilder._process)
  hash      the content hashes (InputProcessor.attach_sources: RGB copy + hash / encoded bytes)
  pack      msgpack of the EncodeRequest sent to the encoder node (protocol.encode)
The phase table is the median of `--requests` requests run one after another; then the whole
front runs on 1, 2, 4 ... threads at once (`--threads`), each request timed end to end: requests/s
and p50 / p99 latency, which shows what the GIL does to it. `--model`: a checkpoint directory for
its tokenizer and chat template (default: a tiny random Qwen2.5-VL written to a temporary
directory, as `epd tiny-model qwen2_5_vl DIR` writes it). Prints a table; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pybase64
from PIL import Image

from epd import protocol
from epd.media import encoded, loading
from router.prompts import PromptBuilder
from router.schemas import ChatCompletionRequest

PHASES = ("json", "render", "base64", "image", "tokenize", "hash", "pack")
MODES = ("decode", "header")


@dataclass
class Front:
    """The router's front as it runs for one mode ("decode": the image decoded in the router and its
    RGB sent; "header": read up to its header and its bytes sent)."""
    builder: PromptBuilder
    mode: str
    sent_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, body: bytes, times: dict[str, float] | None = None) -> None:
        """One request's front; `times` gets each phase's seconds."""
        clock = _Clock(times)
        with clock("json"):
            req = ChatCompletionRequest.model_validate(orjson.loads(body))
        with clock("render"):
            rendered = self.builder._render(req.messages)
        limits, budget = self.builder.limits, loading.PixelBudget(self.builder.limits.max_request_pixels)
        wheres = [loading._Where(i, ref.param) for i, ref in enumerate(rendered.images)]
        with clock("base64"):
            datas = [loading._read_source(ref.url, None, False, limits, where)
                     for ref, where in zip(rendered.images, wheres, strict=True)]
        read = loading._decode if self.mode == "decode" else encoded.probe_bytes
        with clock("image"):
            images = [read(data, limits, where, None, budget) for data, where in zip(datas, wheres, strict=True)]
        with clock("tokenize"):
            inp = self.builder._process(rendered.text, None, images, "messages")
        with clock("hash"):
            self.builder.inputs.attach_sources(inp.images)
        with clock("pack"):   # as router.pipeline builds them
            payloads = [protocol.ImagePayload(im.source.width, im.source.height, im.source_rgb or b"",
                                              im.content_hash or "", im.layout.to_wire(), im.source_data)
                        for im in inp.images]
            frame = protocol.encode(protocol.EncodeRequest("chatcmpl-bench", payloads, "prefill-0",
                                                           "127.0.0.1:5555"))
        self.sent_bytes = len(frame)


class _Clock:
    def __init__(self, times: dict[str, float] | None) -> None:
        self.times = times

    def __call__(self, phase: str) -> _Clock:
        self.phase = phase
        return self

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.times is not None:
            self.times[self.phase] = self.times.get(self.phase, 0.0) + time.perf_counter() - self.start


def picture(width: int, height: int, seed: int) -> bytes:
    """A JPEG (quality 90) of a colour gradient with noise: about the size of a photograph's."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([x * 255, y * 255, (1 - x) * 160 + 40 * np.sin(12 * y)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def request_body(builder: PromptBuilder, jpegs: list[bytes], text_tokens: int) -> bytes:
    """A chat request with the JPEGs as data URIs and about `text_tokens` tokens of text."""
    words = " ".join(f"please describe item {i} in the pictures and compare its colours" for i in range(24))
    text = builder.tokenizer.decode(builder.tokenizer.encode(words, add_special_tokens=False)[:text_tokens])
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + pybase64.b64encode(j).decode()}}
             for j in jpegs]
    return orjson.dumps({"model": "m", "max_tokens": 16,
                         "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]})


def phase_medians(front: Front, body: bytes, requests: int) -> dict[str, float]:
    """Each phase's median ms over `requests` requests run one after another (after a warm-up)."""
    for _ in range(3):
        front.run(body)
    samples: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    for _ in range(requests):
        times: dict[str, float] = {}
        start = time.perf_counter()
        front.run(body, times)
        times["total"] = time.perf_counter() - start
        for phase, seconds in times.items():
            samples[phase].append(seconds * 1e3)
    return {phase: statistics.median(values) for phase, values in samples.items()}


def under_threads(front: Front, body: bytes, threads: int, requests: int) -> dict[str, float]:
    """`requests` requests over `threads` threads at once: requests/s and latency percentiles (ms)."""
    def one(_: int) -> float:
        start = time.perf_counter()
        front.run(body)
        return (time.perf_counter() - start) * 1e3

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(2 * threads)))    # warm-up: every thread once
        start = time.perf_counter()
        latencies = sorted(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    return {"requests_per_s": requests / wall, "p50_ms": _percentile(latencies, 50),
            "p99_ms": _percentile(latencies, 99), "mean_ms": statistics.fmean(latencies)}


def _percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(q / 100 * (len(sorted_ms) - 1)))]


def _table(results: dict[str, Any]) -> str:
    modes, cfg = list(results["phases"]), results["config"]
    lines = [f"router front: {cfg['images']} x {cfg['resolution']} JPEG q90 ({cfg['jpeg_kb']:.0f} KB each) + "
             f"{cfg['text_tokens']} text tokens; {cfg['cpus']} CPUs; median of {cfg['requests']} requests",
             f"{'phase (ms / request)':<22}" + "".join(f"{m:>10}" for m in modes)]
    for phase in (*PHASES, "total"):
        lines.append(f"{phase:<22}" + "".join(f"{results['phases'][m][phase]:>10.2f}" for m in modes))
    lines.append(f"{'sent to encoder (KB)':<22}" + "".join(f"{results['sent_kb'][m]:>10.0f}" for m in modes))
    lines += ["", f"{'threads':<9}{'mode':<8}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"]
    for threads in cfg["threads"]:
        for m in modes:
            r = results["concurrency"][m][str(threads)]
            lines.append(f"{threads:<9}{m:<8}{r['requests_per_s']:>8.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}")
    return "\n".join(lines)


def _model_dir(given: str | None, scratch: Callable[[], str]) -> str:
    if given:
        return given
    from epd.models.tiny_model import write_tiny_model

    return write_tiny_model("qwen2_5_vl", os.path.join(scratch(), "tiny_q25"), "tiny", seed=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    threads = [int(t) for t in args.threads.split(",")]
    modes = [m for m in args.mode.split(",") if m]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--mode: a comma-separated list of {', '.join(MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        builder = PromptBuilder(_model_dir(args.model, lambda: tmp), 1 << 20)
        jpegs = [picture(width, height, seed) for seed in range(args.images)]
        body = request_body(builder, jpegs, args.text_tokens)
        results: dict[str, Any] = {"config": {
            "images": args.images, "resolution": f"{width}x{height}", "text_tokens": args.text_tokens,
            "jpeg_kb": statistics.fmean(len(j) for j in jpegs) / 1024, "body_kb": len(body) / 1024,
            "requests": args.requests, "threads": threads, "cpus": os.cpu_count()},
            "phases": {}, "sent_kb": {}, "concurrency": {}}
        for mode in modes:
            front = Front(builder, mode)
            results["phases"][mode] = phase_medians(front, body, args.requests)
            results["sent_kb"][mode] = front.sent_bytes / 1024
            results["concurrency"][mode] = {str(t): under_threads(front, body, t, args.requests) for t in threads}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.router_front", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--resolution", default="1280x720", help="WIDTHxHEIGHT of each JPEG")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--threads", default="1,2,4", help="comma-separated thread counts")
    ap.add_argument("--requests", type=int, default=64, help="requests per measurement")
    ap.add_argument("--mode", default="decode,header",
                    help="decode: the router decodes and sends RGB (before); header: header only, bytes sent (now)")
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random Qwen2.5-VL)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    results = run(args)
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
