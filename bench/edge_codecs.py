"""The router's per-request codecs, standard library against the libraries vLLM and SGLang use.

    python3 -m bench.edge_codecs [--image-mb 3.7] [--repeat 50]

Measures, on this machine, the median time of
- decoding a base64 data URI of an image of `--image-mb` MB (random bytes: base64 does not care
  what they are): `base64.b64decode(validate=True)` against `pybase64.b64decode(validate=True)`;
- serializing one streamed chat chunk (one token of text, as the router sends per token):
  `json.dumps(ensure_ascii=False)` against `orjson.dumps`, and the non-streaming response of 512
  tokens with logprobs.
- with `--redis-url`: one Redis round trip (HSET) on the request path, the synchronous client
  through `asyncio.to_thread` (as the router's disaggregated pipeline calls it) against
  `redis.asyncio`, both awaited from a running event loop.
Prints one JSON object; BENCHMARKS.md keeps the figures that decided the router's choice.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time
from collections.abc import Callable

import orjson
import pybase64
import redis
import redis.asyncio


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _chunk() -> dict:
    return {"id": "chatcmpl-5f0c2a", "object": "chat.completion.chunk", "created": 1796600000,
            "model": "Qwen/Qwen2.5-VL-3B-Instruct",
            "choices": [{"index": 0, "delta": {"content": " cat"}, "logprobs": None, "finish_reason": None}]}


def _response(tokens: int) -> dict:
    content = [{"token": f" w{i}", "logprob": -0.25, "bytes": [32, 119, 49],
                "top_logprobs": [{"token": f" v{j}", "logprob": -1.5, "bytes": [32, 118]} for j in range(5)]}
               for i in range(tokens)]
    return {"id": "chatcmpl-5f0c2a", "object": "chat.completion", "created": 1796600000, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "w " * tokens},
                         "logprobs": {"content": content}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": tokens, "total_tokens": 1000 + tokens}}


async def _redis_round_trips_us(url: str, repeat: int) -> dict[str, float]:
    sync, aio = redis.Redis.from_url(url), redis.asyncio.Redis.from_url(url)
    try:
        async def median_us(call: Callable[[], object]) -> float:
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                await call()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e6
        key = ("epd-bench:room", "stage", "x")
        return {"redis_hset_to_thread_us": await median_us(lambda: asyncio.to_thread(sync.hset, *key)),
                "redis_hset_asyncio_us": await median_us(lambda: aio.hset(*key))}
    finally:
        await aio.delete("epd-bench:room")
        await aio.aclose()
        sync.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.edge_codecs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-mb", type=float, default=3.7)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--redis-url", default=None, help="also time a Redis round trip both ways")
    args = ap.parse_args(argv)
    payload = base64.b64encode(os.urandom(int(args.image_mb * 1e6))).decode()
    assert pybase64.b64decode(payload, validate=True) == base64.b64decode(payload, validate=True)
    chunk, whole = _chunk(), _response(512)
    assert json.loads(orjson.dumps(whole)) == json.loads(json.dumps(whole, ensure_ascii=False))
    ms = {
        "b64decode_stdlib_ms": _median_s(lambda: base64.b64decode(payload, validate=True), args.repeat) * 1e3,
        "b64decode_pybase64_ms": _median_s(lambda: pybase64.b64decode(payload, validate=True), args.repeat) * 1e3,
        "chunk_json_us": _median_s(lambda: json.dumps(chunk, ensure_ascii=False), args.repeat * 100) * 1e6,
        "chunk_orjson_us": _median_s(lambda: orjson.dumps(chunk), args.repeat * 100) * 1e6,
        "response512_json_ms": _median_s(lambda: json.dumps(whole, ensure_ascii=False), args.repeat) * 1e3,
        "response512_orjson_ms": _median_s(lambda: orjson.dumps(whole), args.repeat) * 1e3,
    }
    if args.redis_url:
        ms |= asyncio.run(_redis_round_trips_us(args.redis_url, args.repeat * 20))
    print(json.dumps({"image_mb": args.image_mb, **{k: round(v, 3) for k, v in ms.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
