"""Helpers for end-to-end tests of the disaggregated path: a real Redis, real node processes
(UCX over TCP), and the router's DisaggBackend driven from one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from deploy.procs import Cluster, NodeProc
from deploy.redis_proc import PrivateRedis
from epd.engine.sampling import SamplingParams
from kv_transfer.auth import ClusterSecret
from router.backend import BackendError, BackendRequest
from router.pipeline import DisaggBackend


@dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    timings: dict
    error: str = ""
    seconds: float = 0.0


class Harness:
    """A cluster plus a DisaggBackend, with synchronous helpers for tests."""

    def __init__(self, cluster: Cluster, redis_url: str) -> None:
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self.backend = DisaggBackend(cluster.model, redis_url, ClusterSecret.load(cluster.secret_file), refresh_s=0.25)
        self.run(self.backend.start())
        self._rid = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def request(self, prompt: str, images=(), **params) -> BackendRequest:
        self._rid += 1
        return BackendRequest(f"t{self._rid}-{time.monotonic_ns()}", prompt, None, list(images),
                              SamplingParams.from_dict({"temperature": 0, **params}))

    async def consume(self, req: BackendRequest, stop_after: int | None = None) -> Result:
        t0 = time.monotonic()
        out = Result([], "", None, {})
        agen = self.backend.generate(req)
        try:
            async for ev in agen:
                out.token_ids.append(ev.token_id)
                out.text += ev.text
                if ev.finished:
                    out.finish_reason, out.timings = ev.finish_reason, ev.timings
                if stop_after is not None and len(out.token_ids) >= stop_after:
                    break
        except BackendError as e:
            out.error = str(e)
        finally:
            await agen.aclose()
        out.seconds = time.monotonic() - t0
        return out

    def generate(self, prompt: str, images=(), **params) -> Result:
        return self.run(self.consume(self.request(prompt, images, **params)))

    def statuses(self) -> dict:
        """NodeStatus of every live node, by node id (a node this test killed may stay registered
        until its TTL passes: it is not asked)."""
        self.run(asyncio.to_thread(self.backend.pool.refresh))
        dead = {n.node_id for n in self.cluster.nodes if not n.alive()}
        out = {}
        for role, nodes in self.backend.pool.nodes.items():
            for node_id in nodes:
                if node_id not in dead:
                    out[node_id] = self.run(self.backend.node_status(role, node_id))
        return out

    def assert_pools_intact(self, settle_s: float = 15.0) -> None:
        """Every node's integrity check passes and no page is still in use (within `settle_s`: a
        hand-over to an address that does not answer holds its pages for the transport's connect
        timeout, 5 s, before giving them back)."""
        deadline = time.monotonic() + settle_s
        while True:
            bad = {nid: s for nid, s in self.statuses().items()
                   if not s.integrity_ok or s.pages_free != s.pages_total}
            if not bad or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not bad, f"page pools not intact: {bad}"

    def node(self, role: str) -> NodeProc:
        """The first live node of `role`."""
        return next(n for n in self.cluster.nodes if n.role == role and n.alive())

    async def until_queued(self, node: NodeProc, queue: str, timeout_s: float = 20.0) -> None:
        """Wait until `node` reports one request in `queue`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = await self.backend.node_status(node.role, node.node_id)
            if status.queues.get(queue) == 1:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{node.node_id}: {queue} never reached 1")

    def wait_gone(self, node: NodeProc, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.cluster.nodes and time.monotonic() < deadline:
            self.run(asyncio.to_thread(self.backend.pool.refresh))
            if not self.backend.pool.alive(node.role, node.node_id):
                return
            time.sleep(0.2)
        raise AssertionError(f"{node.node_id} still registered after {timeout_s}s")

    def close(self) -> None:
        self.run(self.backend.close())
        self.loop.close()


@contextlib.contextmanager
def disagg_cluster(model: str, tmp_dir: str, roles: dict[str, list[list[str]]],
                   common_args: list[str] | None = None, device: str = "cpu",
                   env: dict[str, str] | None = None) -> Iterator[Harness]:
    """roles: {"encoder": [[extra args of node 1], ...], "prefill": [...], "decode": [...]};
    env: set in every node process."""
    redis = PrivateRedis().start()
    cluster = Cluster(model, redis.url, tmp_dir, device=device, common_args=common_args or [], extra_env=env or {})
    harness = None
    try:
        for role, nodes in roles.items():
            for extra in nodes:
                cluster.add(role, extra)
        cluster.wait_ready()
        harness = Harness(cluster, redis.url)
        yield harness
    finally:
        if harness is not None:
            harness.close()
        cluster.stop()
        redis.stop()
