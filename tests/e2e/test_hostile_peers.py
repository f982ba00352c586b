"""A local process without the cluster secret, and one with it sending garbage, against running
nodes (1E + 1P + 1D, real Redis, real UCX over TCP): the cases the trust-boundaries issue found,
each now failing safely. Afterwards a normal request is served token-exact and every pool is intact.

- forged abort of a streaming victim's request id, and a flood of bogus requests, from a peer
  without the secret: refused, the victim's answer is whole;
- thousands of malformed control messages (hypothesis), sealed with the secret: refused and
  counted, no node dies;
- a request id a node already holds: refused, the request that has it goes on, no page leaks;
- a fake decode node written into Redis: never routed to;
- unsolicited UCX transfers (no secret; with it, unannounced, 5 x 100 MB): connections closed,
  the decode node's memory does not grow by them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time

import msgpack
import pytest
import torch
import zmq
from disagg_support import disagg_cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import chat_prompt, hf_generate

from epd import protocol
from kv_transfer.auth import ClusterSecret
from kv_transfer.registry import NodeInfo, NodeRegistry
from kv_transfer.transport import KVTransport

TTL = ["--heartbeat-ttl", "2", "--kv-timeout", "30"]
PROMPT = chat_prompt("Tell me a long story about a red cat.")


@pytest.fixture(scope="module")
def harness(tiny_models, tmp_path_factory):
    roles = {"encoder": [[]], "prefill": [[]], "decode": [[]]}
    with disagg_cluster(tiny_models["qwen2_vl"], str(tmp_path_factory.mktemp("logs")), roles, TTL) as h:
        yield h


@pytest.fixture(scope="module")
def secret(harness) -> ClusterSecret:
    return ClusterSecret.load(harness.cluster.secret_file)


class Peer:
    """A DEALER socket to every live node, sealing frames with `secret` (None: sends them raw)."""

    def __init__(self, harness, secret: ClusterSecret | None) -> None:
        self.ctx, self.secret = zmq.Context(), secret
        self.socks = []
        for node in harness.backend.pool.nodes.values():
            for info in node.values():
                sock = self.ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://{info.zmq}")
                self.socks.append(sock)

    def send(self, payload: bytes) -> None:
        frames = self.secret.seal(payload) if self.secret is not None else [payload]
        for sock in self.socks:
            sock.send_multipart(frames)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.ctx.term()


def _rejected(harness) -> int:
    return sum(s.rejected_messages for s in harness.statuses().values())


def _victim(harness, during) -> list[int]:
    """Stream a victim request while `during()` runs; its token ids."""
    req = harness.request(PROMPT, max_new_tokens=24, ignore_eos=True)

    async def scenario():
        task = asyncio.ensure_future(harness.consume(req))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(during, req.rid)
        return await task

    result = harness.run(scenario())
    assert not result.error, result.error
    return result.token_ids


def test_forged_abort_and_a_flood_without_the_secret_change_nothing(harness, secret):
    expected = harness.generate(PROMPT, max_new_tokens=24, ignore_eos=True).token_ids
    outsider = Peer(harness, ClusterSecret(os.urandom(32)))   # a secret of its own
    raw = Peer(harness, None)
    before = _rejected(harness)

    def attack(rid: str) -> None:
        outsider.send(protocol.encode(protocol.Abort(rid)))
        raw.send(protocol.encode(protocol.Abort(rid)))
        for i in range(345):
            bogus = protocol.DecodeRequest(f"bogus-{i}", [1] * 1000, {"max_new_tokens": 3000}, "p", "x", "127.0.0.1:1")
            outsider.send(protocol.encode(bogus))

    assert _victim(harness, attack) == expected
    outsider.close()
    raw.close()
    assert _rejected(harness) - before >= 3 * (2 + 345)   # every frame, at every node
    harness.assert_pools_intact()


_INTS = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)   # what msgpack carries
_VALUES = st.one_of(st.none(), st.booleans(), _INTS, st.floats(), st.text(max_size=20), st.binary(max_size=20),
                    st.lists(_INTS, max_size=5), st.dictionaries(st.text(max_size=5), _INTS, max_size=3))


def _bodies(cls: type) -> st.SearchStrategy:
    names = [f.name for f in dataclasses.fields(cls)] + ["extra"]
    return st.dictionaries(st.sampled_from(names), _VALUES, max_size=len(names))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def _fuzz(data, peer: Peer) -> None:
    if data.draw(st.booleans()):
        payload = data.draw(st.binary(max_size=64))
    else:
        tag = data.draw(st.sampled_from([*protocol.MESSAGE_TYPES, 0, 99]))
        cls = protocol.MESSAGE_TYPES.get(tag, protocol.Abort)
        version = data.draw(st.sampled_from([protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION + 1]))
        payload = msgpack.packb([version, tag, data.draw(_bodies(cls))], use_bin_type=True)
    peer.send(payload)


def test_thousands_of_malformed_sealed_messages_are_refused_and_counted(harness, secret):
    peer = Peer(harness, secret)
    before = _rejected(harness)
    _fuzz(peer=peer)
    deadline = time.monotonic() + 30   # the nodes work through what was sent
    while _rejected(harness) - before <= 1000 and time.monotonic() < deadline:
        time.sleep(0.5)
    peer.close()
    assert all(n.alive() for n in harness.cluster.nodes)
    assert _rejected(harness) - before > 1000
    def routed() -> float:   # the router's gauge, from the reports of its pool refreshes (a refresh behind)
        metrics = harness.backend.stats()
        return sum(metrics[f"node_rejected_messages|{role}"] for role in ("encoder", "prefill", "decode"))

    deadline = time.monotonic() + 15
    while routed() <= 1000 and time.monotonic() < deadline:
        harness.run(asyncio.sleep(0.5))   # the router's loop runs its refreshes meanwhile
    assert routed() > 1000
    harness.assert_pools_intact()


def test_a_request_id_in_use_is_refused_without_touching_its_request(harness, secret):
    expected = harness.generate(PROMPT, max_new_tokens=24, ignore_eos=True).token_ids
    peer = Peer(harness, secret)

    def duplicate(rid: str) -> None:
        peer.send(protocol.encode(protocol.DecodeRequest(rid, [5, 6, 7], {}, "p", "x", "127.0.0.1:1")))
        peer.send(protocol.encode(protocol.PrefillRequest(rid, [5, 6, 7], [], {}, "d", "127.0.0.1:1")))

    assert _victim(harness, duplicate) == expected
    peer.close()
    harness.assert_pools_intact()


def test_a_node_written_into_redis_without_the_secret_is_never_routed_to(harness):
    fake = NodeInfo("decode", "fake-decode", zmq="127.0.0.1:1", ucx="127.0.0.1:2", model="x",
                    layout_hash=harness.node("decode").node_id, capacity=10**6, started_at=time.time())
    lease = NodeRegistry(harness.backend.redis).register(fake, ttl_s=30)   # no secret: no signature
    try:
        harness.run(asyncio.sleep(0.6))
        assert "fake-decode" not in harness.backend.pool.nodes["decode"]
        assert all(not harness.generate(PROMPT, max_new_tokens=4).error for _ in range(4))
    finally:
        lease.deregister()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _refusals(node) -> int:
    """Connections the node's transport closed, from its log."""
    with open(node.log_path, errors="replace") as f:
        return sum(1 for line in f if "closed the connection from" in line or "closing a connection" in line)


def test_unsolicited_transfers_are_refused_before_anything_is_allocated(harness, secret, tiny_models):
    decode = harness.node("decode")
    address = harness.backend.pool.nodes["decode"][decode.node_id].ucx
    before = _rss_mb(decode.proc.pid)
    big = torch.zeros(100 << 20, dtype=torch.uint8)
    refusals = _refusals(decode)
    for with_secret in (None, secret):
        with KVTransport("127.0.0.1", secret=with_secret) as t:
            sends = [t.send(address, f"victim-{i}:kv:0", [big]) for i in range(5)]
            for f in sends:   # the node closes the connection; what UCX had already pushed may report done
                with contextlib.suppress(Exception):
                    f.result(timeout=30)
        deadline = time.monotonic() + 10
        while _refusals(decode) == refusals and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _refusals(decode) > refusals, "the decode node did not close the connection"
        refusals = _refusals(decode)
    grown = _rss_mb(decode.proc.pid) - before
    assert grown < 100, f"decode node grew by {grown:.0f} MB"
    assert decode.alive()
    reference_ids = harness.backend.inputs.process(prompt=PROMPT).input_ids
    got = harness.generate(PROMPT, max_new_tokens=8)
    assert got.token_ids == hf_generate(tiny_models["qwen2_vl"], reference_ids, [], 8)
    harness.assert_pools_intact()
