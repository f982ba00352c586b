"""``python -m bench`` against a real FastAPI + uvicorn SSE server in another process.

The unit tests use a raw asyncio server; this one checks the harness against the HTTP stack
real OpenAI-compatible servers use (Starlette ``StreamingResponse`` over uvicorn), with
scripted timing: TTFT 100 ms, then one token every 10 ms, usage and ``epd_timings`` in the
final chunk, and every fourth request answered with HTTP 500.

Run as a script (``python test_bench_uvicorn.py PORT``) it is that server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

REPO = Path(__file__).resolve().parents[2]
TTFT_S, ITL_S = 0.1, 0.01
TIMINGS = {"queue_ms": 0.5, "encode_ms": 20.0, "prefill_ms": 35.0, "transfer_ms": 3.0, "decode_ms": 80.0}


def build_app() -> FastAPI:
    app = FastAPI()
    counter = itertools.count()

    async def events(n: int) -> AsyncIterator[str]:
        start = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + TTFT_S + i * ITL_S - time.perf_counter()))
            chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
        yield f"data: {json.dumps(done)}\n\n"
        usage = {"prompt_tokens": 40, "completion_tokens": n, "total_tokens": 40 + n}
        yield f"data: {json.dumps({'choices': [], 'usage': usage, 'epd_timings': TIMINGS})}\n\n"
        yield "data: [DONE]\n\n"

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        if next(counter) % 4 == 3:
            return JSONResponse({"error": {"message": "overloaded", "code": 500}}, status_code=500)
        return StreamingResponse(events(int(body["max_tokens"])), media_type="text/event-stream")

    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, str(port)], cwd=REPO, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/models", timeout=1.0, trust_env=False)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bench_cli_against_uvicorn(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = ["--base-url", server_url + "/v1", "--model", "fake-model", "--num-prompts", "12",
            "--random-output-len", "8", "--max-concurrency", "4", "--warmup-requests", "4",
            "--slo", "ttft_ms=150", "--no-progress", "--output", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "EPD server stage timings" in proc.stdout
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (9, 3)  # every 4th request is a 500
    assert sorted(result["errors"])[-3:] == ["HTTP 500: overloaded"] * 3
    assert result["median_ttft_ms"] == pytest.approx(TTFT_S * 1e3, abs=20)
    assert result["median_tpot_ms"] == pytest.approx(ITL_S * 1e3, abs=3)
    assert result["total_output_tokens"] == 9 * 8 and result["total_input_tokens"] == 9 * 40
    assert result["epd_timings"]["encode_ms"]["mean"] == pytest.approx(20.0)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # 500s are not good
    assert result["slo_attainment"] == pytest.approx(9 / 12)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
