"""`epd serve --api-server-count 2`: two router processes on one port in front of the node pools.
Requests on many connections are all served (the same greedy answer), /metrics from whichever
worker a scrape reaches counts every request both served and never goes down, and SIGTERM drains
both workers and exits 0. A local backend (the model in the router) refuses more than one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
from openai_support import REPO, start_until_line
from prometheus_client.parser import text_string_to_metric_families

BODY = {"model": "m", "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 5,
        "temperature": 0, "ignore_eos": True}


def _successes(url: str) -> float:
    with httpx.Client(timeout=10) as client:   # a new connection: any worker may answer
        text = client.get(f"{url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "vllm:request_success"
               for s in f.samples if s.name == "vllm:request_success_total")


async def _burst(url: str, n: int) -> list[tuple[int, str]]:
    async def one() -> tuple[int, str]:
        async with httpx.AsyncClient(timeout=120) as client:   # each its own connection
            r = await client.post(f"{url}/v1/chat/completions", json=BODY)
            return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    return await asyncio.gather(*(one() for _ in range(n)))


def test_two_router_workers_serve_one_port_and_count_together(tiny_models, tmp_path):
    cmd = [sys.executable, "-m", "epd.cli", "serve", "--model", tiny_models["qwen2_vl"], "--port", "0", "--device",
           "cpu", "--log-dir", str(tmp_path / "logs"), "--served-model-name", "m", "--api-server-count", "2"]
    proc, log, line = start_until_line(cmd, "EPD ready on ", 300, "epd serve")
    url = line.split()[3].removesuffix("/v1")
    try:
        routers = [pid for pid in _children(proc.pid) if "router" in _cmdline(pid)]
        workers = [pid for router in routers for pid in _children(int(router)) if "--worker-index" in _cmdline(pid)]
        assert len(workers) == 2, "two router worker processes under the router"
        results = asyncio.run(_burst(url, 12))
        assert {status for status, _ in results} == {200} and len({text for _, text in results}) == 1
        time.sleep(0.5)   # a worker's count reaches the others within 0.2 s
        seen = [_successes(url) for _ in range(8)]
        assert seen[0] >= 12 and seen == sorted(seen), seen
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    router_log = (tmp_path / "logs" / "router.log").read_text()
    assert "EPD router worker 0 ready" in router_log and "EPD router worker 1 ready" in router_log


def test_a_local_backend_refuses_several_workers(tiny_models):
    out = subprocess.run([sys.executable, "-m", "router.main", "--model", tiny_models["qwen2_vl"], "--device", "cpu",
                          "--api-server-count", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--api-server-count > 1 needs node pools" in out.stderr


def _children(parent: int) -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    out.append(pid)
        except OSError:
            continue
    return out


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
