"""Which nodes serve a request, and whether the cluster should take it now.

`route(pool, inp, work, excluded, nodes)` fills `nodes` ({role: NodeInfo}):
- the colocated pool (one node does everything) takes text-only requests whenever it has a node,
  and requests with images when the split pools cannot serve them (no encoder, prefill or decode
  node up); so a deployment of only colocated nodes, of only split pools, or of both (colocated
  nodes for text, the split pools for images) all route without configuration;
- otherwise a prefill node, a decode node with the same KV layout, and for images an encoder node.
Each pool's node is picked by its policy (router.routing).

Backpressure (`foreseen_wait_s`): the router foresees how long the request would wait for its
first token on the nodes just picked: the work queued ahead of it on each (their own last report
plus what this router sent since, this request's included) divided by what each node reports it
gets through per busy second; the encoder's and the prefill's waits add up (they run one after the
other). Above the router's `--ttft-target-ms` the request is refused with a 429 and a
Retry-After, instead of growing a queue whose every request would miss the target. A node that
has not measured its throughput yet foresees no wait.
"""

from __future__ import annotations

from typing import Any

from epd.engine.inputs import ProcessedInput
from kv_transfer.registry import NodeInfo
from router.pool import PoolView
from router.routing import LOAD_QUEUE, Work, block_hashes

RATE_OF_ROLE = {"encoder": "image_tokens", "prefill": "prompt_tokens", "colocated": "prompt_tokens"}


def work_of(inp: ProcessedInput) -> Work:
    spans = [(start, im.num_tokens, im.content_hash) for start, im in zip(inp.image_offsets, inp.images, strict=False)]
    return Work(image_tokens=sum(im.num_tokens for im in inp.images), prompt_tokens=len(inp.input_ids),
                image_hashes=[im.content_hash for im in inp.images if im.content_hash],
                block_hashes=block_hashes(inp.input_ids, spans))


def split_ready(pool: PoolView, with_images: bool) -> bool:
    sizes = pool.sizes()
    return bool(sizes["prefill"] and sizes["decode"] and (sizes["encoder"] or not with_images))


def route(pool: PoolView, inp: ProcessedInput, work: Work, excluded: set[str], nodes: dict[str, NodeInfo]) -> None:
    """Raises NoNodeError; `nodes` then holds what was picked before (to name a layout mismatch)."""
    def allowed(n: NodeInfo) -> bool:
        return n.node_id not in excluded

    colocated = any(not n.draining and allowed(n) for n in pool.nodes["colocated"].values())
    if colocated and (not inp.images or not split_ready(pool, True)):
        nodes["colocated"] = pool.pick("colocated", allowed, work)
        return
    nodes["prefill"] = pool.pick("prefill", allowed, work)
    nodes["decode"] = pool.pick("decode", lambda d: d.layout_hash == nodes["prefill"].layout_hash and allowed(d),
                                work)
    if inp.images:
        nodes["encoder"] = pool.pick("encoder", allowed, work)


def foreseen_wait_s(pool: PoolView, nodes: dict[str, NodeInfo], work: Work) -> float:
    """Seconds the request would queue before its first token on `nodes` (0 where unknown)."""
    wait = 0.0
    for role, node in nodes.items():
        if role not in LOAD_QUEUE:
            continue
        status = pool.reports.get(node.node_id)
        rate = status.rates.get(RATE_OF_ROLE[role], 0.0) if status is not None else 0.0
        if rate > 0:
            wait += (pool.load(role, node.node_id) + work.amount(role)) / rate
    return wait


def pool_gauges(pool: PoolView, reports: dict[str, Any]) -> dict[str, float]:
    """Routing and cache gauges for /metrics: requests routed for their cached inputs per pool, and
    the encoders' embedding-cache hits and lookups (summed over the encoders that answered)."""
    out = {f"routing_affinity_picks_total|{role}": float(n) for role, n in pool.affinity_picks.items()}
    encoders = [r.status for r in reports.values() if r.role == "encoder" and r.status is not None]
    hits = sum(s.queues.get("cache_hits", 0) for s in encoders)
    out["encoder_cache_hits_total"] = float(hits)
    out["encoder_cache_queries_total"] = float(hits + sum(s.queues.get("cache_misses", 0) for s in encoders))
    return out
