"""`epd serve --decodes 2` keeps serving when a process dies: a decode node killed mid-stream fails
only the streams it held (each with an error event), new requests succeed on the other at once,
and the dead node is back within seconds; the private Redis killed is started again and requests
succeed once it is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai_support import start_until_line

PROMPT = [{"role": "user", "content": "Tell me a long story about a red cat."}]


@pytest.fixture(scope="module")
def serve(tiny_models, tmp_path_factory):
    cmd = [sys.executable, "-m", "epd.cli", "serve", "--model", tiny_models["qwen2_vl"], "--port", "0",
           "--device", "cpu", "--decodes", "2", "--log-dir", str(tmp_path_factory.mktemp("logs")),
           "--served-model-name", "m", "--node-args=--heartbeat-ttl 2"]
    proc, log, line = start_until_line(cmd, "EPD ready on ", 240, "epd serve")
    yield proc, log, line.split()[3].removesuffix("/v1")
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


def _processes(marker: str) -> list[int]:
    """Pids whose command line holds `marker`."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            out.append(int(pid))
    return out


async def _stream(url: str, max_tokens: int) -> tuple[int, str]:
    """(tokens the usage chunk counts, the error message of an error event or "")."""
    body = {"model": "m", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with httpx.AsyncClient(timeout=120) as client, \
            client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, (await resp.aread()).decode()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return tokens, event["error"]["message"]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, ""


def _pools(url: str) -> dict:
    resp = httpx.get(f"{url}/health", timeout=5)
    return {**resp.json(), "code": resp.status_code}


def test_a_killed_decode_node_fails_only_its_streams_and_comes_back(serve):
    proc, log, url = serve
    [victim] = _processes(f"--node-id decode-0-{proc.pid} ")

    async def scenario():
        streams = [asyncio.ensure_future(_stream(url, 300)) for _ in range(4)]
        await asyncio.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        fresh = await _stream(url, 8)   # at once, on the other decode node
        return await asyncio.gather(*streams), fresh

    results, fresh = asyncio.run(scenario())
    failed = [error for _, error in results if error]
    assert 0 < len(failed) < 4, results                      # only the streams the dead node held
    assert all("decode" in error for error in failed)
    assert all(tokens == 300 for tokens, error in results if not error)
    assert fresh == (8, "")
    deadline = time.monotonic() + 30
    while _pools(url)["pools"]["decode"] < 2 or not _processes(f"--node-id decode-0-{proc.pid} "):
        assert time.monotonic() < deadline, "".join(log[-20:])
        time.sleep(0.5)
    assert any(f"decode node decode-0-{proc.pid} exited with -9; starting it again" in line for line in log)
    assert proc.poll() is None


def test_the_private_redis_killed_is_started_again(serve):
    proc, log, url = serve
    [redis_pid] = [pid for pid in _processes("redis-server") if Path(f"/proc/{pid}/stat").read_text().split()[3]
                   == str(proc.pid)]
    os.kill(redis_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not any("the private Redis exited; starting it again" in line for line in log):
        assert time.monotonic() < deadline, "".join(log[-20:])
        time.sleep(0.2)
    assert [pid for pid in _processes("redis-server") if pid != redis_pid]   # a new one
    while True:
        health = _pools(url)
        if health["code"] == 200 and health["pools"]["decode"] == 2:
            break
        assert time.monotonic() < deadline, (health, "".join(log[-20:]))
        time.sleep(0.5)
    for _ in range(3):   # ready means ready: no request after it meets an empty pool
        assert asyncio.run(_stream(url, 8)) == (8, "")
