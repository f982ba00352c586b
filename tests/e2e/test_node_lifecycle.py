"""A node as an orchestrator sees it (1E + 1P + 2D, real Redis, real UCX): its own /health and
/metrics on --http-port (published in the registry), the addresses its sockets listen on with
--host 127.0.0.1, a drain on SIGTERM that finishes the streams it holds token for token while new
requests go to the other decode node, and a rolling restart of every node under 16 streams with
no request failing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import time

import httpx
import pytest
from disagg_support import disagg_cluster
from support import chat_prompt

from kv_transfer.registry import NodeRegistry
from router.metrics import parse_exposition

PROMPT = chat_prompt("Tell me a long story about a red cat.")


@pytest.fixture(scope="module")
def harness(tiny_models, tmp_path_factory):
    roles = {"encoder": [[]], "prefill": [[]], "decode": [[], []]}
    args = ["--http-port", "0", "--drain-timeout", "60"]
    with disagg_cluster(tiny_models["qwen2_vl"], str(tmp_path_factory.mktemp("logs")), roles, args) as h:
        yield h


def _http(harness, node) -> str:
    info = NodeRegistry(harness.backend.redis).get(node.role, node.node_id)
    assert info is not None and info.http, f"{node.node_id} publishes no http address"
    return f"http://{info.http}"


def test_every_node_serves_health_and_its_own_metrics(harness):
    harness.generate(PROMPT, max_new_tokens=5)
    for node in harness.cluster.nodes:
        base = _http(harness, node)
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ready"
        assert health.json()["role"] == node.role
        time.sleep(1.1)   # the loop refreshes the snapshot every second
        samples = parse_exposition(httpx.get(f"{base}/metrics", timeout=5).text)
        labels = (("node", node.node_id), ("role", node.role))
        assert samples[("process_resident_memory_bytes", ())] > 0
        if node.role != "encoder":
            assert samples[("epd:kv_pages_total", labels)] > 0
            assert samples[("epd:kv_integrity_ok", labels)] == 1
    prefill = harness.node("prefill")
    samples = parse_exposition(httpx.get(f"{_http(harness, prefill)}/metrics", timeout=5).text)
    key = ("epd:work_done_total", (("kind", "prompt tokens"), ("node", prefill.node_id), ("role", "prefill")))
    assert samples[key] > 0
    assert httpx.get(f"{_http(harness, prefill)}/nope", timeout=5).status_code == 404


def _listening(pid: int) -> dict[int, set[str]]:
    """{port: addresses} of the TCP sockets process `pid` listens on (/proc, as `ss -ltnp` reads it)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.islink(f"/proc/{pid}/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out: dict[int, set[str]] = {}
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in [line.split() for line in f][1:]:
                if row[3] != "0A" or row[9] not in inodes:   # 0A: LISTEN
                    continue
                address, port = row[1].split(":")
                raw = bytes.fromhex(address)   # 32-bit words in host (little-endian) order
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.setdefault(int(port, 16), set()).add(str(ipaddress.ip_address(packed)))
    return out


def test_a_node_told_host_127_0_0_1_listens_on_loopback_but_for_the_ucx_listener_port(harness):
    """ZMQ, /health and UCX's transports bind 127.0.0.1; the UCX listener's own port listens on every
    interface, because ucxx (0.52) binds its listener to the wildcard whatever it is asked (it takes
    a port only). Should this start failing because that port is on 127.0.0.1, ucxx learnt to bind
    an address: then every socket is on loopback."""
    for node in harness.cluster.nodes:
        info = NodeRegistry(harness.backend.redis).get(node.role, node.node_id)
        ucx_port = int(info.ucx.rpartition(":")[2])
        ports = _listening(node.proc.pid)
        assert int(info.zmq.rpartition(":")[2]) in ports and int(info.http.rpartition(":")[2]) in ports
        assert ports.pop(ucx_port) == {"0.0.0.0"}, "the UCX listener's port"
        assert ports and all(addresses == {"127.0.0.1"} for addresses in ports.values()), \
            f"{node.node_id} listens beyond loopback: {ports}"


def test_sigterm_drains_a_decode_node_its_streams_finish_and_new_requests_go_elsewhere(harness):
    expected = harness.generate(PROMPT, max_new_tokens=60, ignore_eos=True).token_ids
    victims = [harness.request(PROMPT, max_new_tokens=60, ignore_eos=True) for _ in range(4)]

    async def busiest_decode():
        nodes = [n for n in harness.cluster.nodes if n.role == "decode" and n.alive()]
        running = [(await harness.backend.node_status(n.role, n.node_id)).queues.get("running", 0) for n in nodes]
        return nodes[running.index(max(running))], max(running)

    async def scenario():
        streams = [asyncio.ensure_future(harness.consume(req)) for req in victims]
        await asyncio.sleep(0.5)
        draining, running = await busiest_decode()
        assert running > 0
        base = _http(harness, draining)
        draining.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert NodeRegistry(harness.backend.redis).get("decode", draining.node_id).draining == 1   # said at once
        health = await asyncio.to_thread(httpx.get, f"{base}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        await asyncio.sleep(0.5)   # the router's next pool refresh
        after = await harness.consume(harness.request(PROMPT, max_new_tokens=10, ignore_eos=True))
        return draining, await asyncio.gather(*streams), after

    draining, results, after = harness.run(scenario())
    assert [r.error for r in results] == [""] * 4
    assert all(r.token_ids == expected for r in results)       # whole, token for token
    assert not after.error and after.token_ids == expected[:10]   # served by the other decode node
    assert draining.proc.wait(30) == 0                          # exits 0 once it holds nothing
    harness.assert_pools_intact()


def test_a_rolling_restart_of_every_node_under_16_streams_fails_no_request(harness):
    """As a Deployment's rollout does it: for each node, a new one comes up, then the old one gets
    SIGTERM and drains. 16 streams run all along (a new one as each ends): none fails, every answer
    is whole and token-exact, and every pool is intact afterwards."""
    expected = harness.generate(PROMPT, max_new_tokens=30, ignore_eos=True).token_ids
    cluster = harness.cluster
    serving = {n.role for n in cluster.nodes if n.alive()}
    count = sum(1 for n in cluster.nodes if n.alive())

    def roll() -> None:
        for old in [n for n in cluster.nodes if n.alive()]:
            new = cluster.add(old.role, node_id=f"{old.node_id}-next")
            cluster.wait_ready([new])
            time.sleep(0.6)   # the router's next pool refresh sees it
            old.proc.send_signal(signal.SIGTERM)
            assert old.proc.wait(60) == 0, old.log_tail()

    async def scenario():
        rolling = asyncio.ensure_future(asyncio.to_thread(roll))
        results = []

        async def stream_until_rolled():
            while not rolling.done():
                results.append(await harness.consume(harness.request(PROMPT, max_new_tokens=30, ignore_eos=True)))

        await asyncio.gather(*(stream_until_rolled() for _ in range(16)))
        await rolling
        return results

    results = harness.run(scenario())
    assert len(results) > 16
    assert [r.error for r in results if r.error] == []
    assert all(r.token_ids == expected for r in results)
    alive = [n for n in cluster.nodes if n.alive()]
    assert len(alive) == count and {n.role for n in alive} == serving
    assert all(n.node_id.endswith("-next") for n in alive)      # every node was replaced
    harness.assert_pools_intact()
