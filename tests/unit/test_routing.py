"""Routing policies: where cache_aware and least_load send a request, from the nodes' own reports."""

from __future__ import annotations

import dataclasses
import time

import redis

from epd import protocol
from kv_transfer.auth import ClusterSecret
from kv_transfer.registry import NodeInfo
from router.planning import foreseen_wait_s
from router.pool import PoolView
from router.routing import BLOCK_TOKENS, PrefixIndex, Work, block_hashes, rendezvous


def _pool(policy: str = "cache_aware", **nodes: list[str]) -> PoolView:
    pool = PoolView(redis.Redis(port=1), ClusterSecret(b"k" * 32), policy)   # never connects here
    for role, ids in nodes.items():
        pool.nodes[role] = {i: NodeInfo(role, i, zmq=f"h:{n}") for n, i in enumerate(ids)}
    return pool


def _report(pool: PoolView, node: str, queued: int = 0, rate: float = 0.0, pages=(100, 100),
            key: str = "queued_prompt_tokens") -> None:
    pool.reported(protocol.NodeStatus(node, "x", pages_total=pages[0], pages_free=pages[1], page_size=16,
                                      queues={key: queued}, rates={"prompt_tokens": rate, "image_tokens": rate}))


def _work(ids: list[int], image_hashes=(), spans=()) -> Work:
    return Work(image_tokens=sum(c for _, c, _ in spans), prompt_tokens=len(ids), image_hashes=list(image_hashes),
                block_hashes=block_hashes(ids, list(spans)))


def test_blocks_of_one_placeholder_differ_by_the_image_they_hold():
    ids = [7] * (4 * BLOCK_TOKENS)
    a = block_hashes(ids, [(BLOCK_TOKENS, 2 * BLOCK_TOKENS, "cat")])
    b = block_hashes(ids, [(BLOCK_TOKENS, 2 * BLOCK_TOKENS, "dog")])
    assert a[0] == b[0] and a[1] != b[1] and a[3] != b[3]   # chained: what follows an image differs too
    assert len(block_hashes(list(range(BLOCK_TOKENS - 1)), [])) == 0


def test_prefix_index_finds_the_longest_run_and_forgets_gone_nodes():
    index = PrefixIndex()
    blocks = block_hashes(list(range(8 * BLOCK_TOKENS)), [])
    index.record(blocks[:6], "p1")
    index.record(blocks[:2], "p2")   # the first two blocks last went to p2
    assert index.longest(blocks, {"p1", "p2"}) == ("p2", 2)
    assert index.longest(blocks, {"p1"}) == (None, 0)
    index.forget({"p1"})
    assert index.longest(blocks, {"p1", "p2"}) == (None, 0)


def test_rendezvous_keeps_an_image_on_its_encoder_when_another_joins():
    keys = [f"img{i}" for i in range(200)]
    before = {k: rendezvous(k, ["e1", "e2"]) for k in keys}
    after = {k: rendezvous(k, ["e1", "e2", "e3"]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "e3" for k in moved) and 30 < len(moved) < 110


def test_cache_aware_sends_a_repeated_prompt_to_its_node_unless_it_is_much_busier():
    pool = _pool(colocated=["c1", "c2"])
    _report(pool, "c1", 0)
    _report(pool, "c2", 0)
    work = _work(list(range(10 * BLOCK_TOKENS)))
    first = pool.pick("colocated", work=work)
    pool.assign("colocated", first, work, "r1")
    other = "c2" if first.node_id == "c1" else "c1"
    _report(pool, first.node_id, 2 * len(work.block_hashes) * BLOCK_TOKENS)   # busy, but not too busy
    assert pool.pick("colocated", work=work).node_id == first.node_id
    _report(pool, first.node_id, 100_000)   # far busier than the other: least load wins
    assert pool.pick("colocated", work=work).node_id == other
    assert _pool("least_load", colocated=["c1", "c2"]).pick("colocated", work=work).node_id == "c1"


def test_router_workers_send_a_shared_prefix_to_one_node_without_sharing_their_index():
    """Several router processes (`--api-server-count`), each with its own prefix index: prompts of
    one prefix reach the same prefill node through any of them (a lone router keeps least load
    for prompts it never sent)."""
    workers = [_pool(prefill=["p1", "p2", "p3"]) for _ in range(3)]
    for i, pool in enumerate(workers):
        pool.hash_unseen_prefixes = True
        for node in ("p1", "p2", "p3"):
            _report(pool, node, 0)
        for j, node in enumerate(("p1", "p2", "p3")):   # each has sent other work: their least-loaded nodes differ
            if j != i:
                pool.assign("prefill", pool.nodes["prefill"][node], _work([9] * BLOCK_TOKENS), f"other-{j}")
    placed = set()
    for prefix in range(12):
        system = [1000 + prefix] * (2 * BLOCK_TOKENS)
        picks = set()
        for i, pool in enumerate(workers):   # each worker sees a different question after the prefix
            work = _work(system + [7, 8, 9, i] * BLOCK_TOKENS)
            node = pool.pick("prefill", work=work)
            pool.assign("prefill", node, work, f"r{prefix}-{i}")
            pool.end(node.node_id, f"r{prefix}-{i}")   # done: only the other work stays queued
            picks.add(node.node_id)
        assert len(picks) == 1, f"prefix {prefix} went to {picks}"
        placed |= picks
    assert placed == {"p1", "p2", "p3"}, "different prefixes still spread over the pool"
    lone = _pool(prefill=["p1", "p2", "p3"])
    for node in ("p1", "p2", "p3"):
        _report(lone, node, 0)
    assert lone.pick("prefill", work=_work([5] * (2 * BLOCK_TOKENS))).node_id == "p1"   # least load, then id


def test_least_load_reads_the_nodes_reports_and_what_was_sent_since():
    pool = _pool("least_load", prefill=["p1", "p2"], decode=["d1", "d2"])
    _report(pool, "p1", 500)
    _report(pool, "p2", 100)
    work = _work(list(range(300)))
    assert pool.pick("prefill", work=work).node_id == "p2"
    pool.assign("prefill", pool.nodes["prefill"]["p2"], work, "r1")   # p2: 100 + 300 sent since
    pool.assign("prefill", pool.nodes["prefill"]["p2"], work, "r2")   # 700 now
    assert pool.pick("prefill", work=work).node_id == "p1"
    pool.end("p2", "r1")   # over before p2 reported again: 400
    assert pool.load("prefill", "p2") == 400 and pool.pick("prefill", work=work).node_id == "p2"
    _report(pool, "d1", pages=(100, 10))    # 90 % of its pages in use
    _report(pool, "d2", pages=(100, 60))
    assert pool.pick("decode", work=work).node_id == "d2"


def test_the_foreseen_wait_is_queued_work_over_measured_throughput():
    pool = _pool(prefill=["p1"], encoder=["e1"], decode=["d1"])
    _report(pool, "p1", queued=1000, rate=2000.0)
    _report(pool, "e1", queued=400, rate=1000.0, key="queued_image_tokens")
    nodes = {role: next(iter(pool.nodes[role].values())) for role in ("prefill", "encoder", "decode")}
    work = _work(list(range(1000)), ["h"], [(0, 200, "h")])
    # encoder (400 + 200) / 1000 + prefill (1000 + 1000) / 2000
    assert abs(foreseen_wait_s(pool, nodes, work) - 1.6) < 1e-9
    _report(pool, "p1", queued=1000, rate=0.0)   # not measured yet: no wait foreseen there
    assert abs(foreseen_wait_s(pool, nodes, work) - 0.6) < 1e-9


def test_a_node_that_leaves_takes_its_prefix_blocks_report_and_sent_work_with_it():
    pool = _pool(prefill=["p1", "p2"])
    work = _work(list(range(4 * BLOCK_TOKENS)))
    _report(pool, "p1", 50)
    pool.assign("prefill", pool.nodes["prefill"]["p1"], work, "r1")
    registered = {"prefill": [pool.nodes["prefill"]["p2"]]}
    pool.registry.list_nodes = lambda role: registered.get(role, [])   # p1 left the registry
    pool.registry.server_run_id = lambda: "run-1"
    pool.refresh()
    assert "p1" not in pool.reports and "p1" not in pool.sent
    assert pool.prefixes["prefill"].longest(work.block_hashes, {"p1", "p2"}) == (None, 0)
    registered["prefill"].append(NodeInfo("prefill", "p1", zmq="h:9"))   # back, a new process
    pool.refresh()
    assert pool.load("prefill", "p1") == 0 and pool.preferred("prefill", work, ["p1", "p2"]) is None


def test_after_a_redis_restart_nodes_are_kept_until_their_own_ttl_passes_without_them_registering():
    pool = _pool(decode=["d1", "d2"])
    pool.nodes["decode"] = {n: dataclasses.replace(info, ttl_s=0.3) for n, info in pool.nodes["decode"].items()}
    registered: dict[str, list[NodeInfo]] = {"decode": list(pool.nodes["decode"].values())}
    run_id = ["run-1"]
    pool.registry.list_nodes = lambda role: registered.get(role, [])
    pool.registry.server_run_id = lambda: run_id[0]
    pool.refresh()
    run_id[0], registered["decode"] = "run-2", []   # Redis restarted empty; the nodes have not beaten yet
    pool.refresh()
    assert pool.sizes()["decode"] == 2
    registered["decode"] = [pool.nodes["decode"]["d2"]]   # d2 registers again, d1 never does
    time.sleep(0.35)
    pool.refresh()
    assert list(pool.nodes["decode"]) == ["d2"]
    registered["decode"] = []   # without a restart, a record that is gone is a node that is gone
    pool.refresh()
    assert pool.sizes()["decode"] == 0
