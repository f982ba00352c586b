"""The router's view of the node pools, refreshed from Redis, and the routing policies.

`PoolView.refresh()` re-reads `epd:node:{role}:*` (a node that registers is picked within one
refresh interval; one whose key expired is gone after the next refresh; after a Redis restart, which
loses every record at once, a node seen before is kept until its own TTL has passed without it
registering again, as if its record had outlived the restart); `reported(status)` keeps
each node's latest own report (the router polls them). `pick(role, accept, work)` applies the
pool's policy (router.routing: round_robin, least_load, cache_aware) to the live, non-draining
nodes that `accept` admits; `begin` / `end` count what this router has in flight on each node.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable

import redis

from epd import protocol
from kv_transfer.auth import ClusterSecret
from kv_transfer.registry import NodeInfo, NodeRegistry
from router.routing import LOAD_QUEUE, POLICIES, PrefixIndex, Work, affine_node, balanced

ROLES = ("encoder", "prefill", "decode", "colocated")
DEFAULT_TTL_S = 6.0   # a node's record lifetime when it does not publish its own (the nodes' default)


class NoNodeError(RuntimeError):
    pass


class PoolView:
    def __init__(self, client: redis.Redis, secret: ClusterSecret, policy: str | dict[str, str] = "least_load") -> None:
        """Only nodes whose registry entry carries the cluster's signature are seen. `policy`: one
        for every pool, or {role: policy} (pools not named: least_load)."""
        self.policies = {role: policy if isinstance(policy, str) else policy.get(role, "least_load")
                         for role in ROLES}
        for name in self.policies.values():
            if name not in POLICIES:
                raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(POLICIES)}")
        self.registry = NodeRegistry(client, secret)
        self.nodes: dict[str, dict[str, NodeInfo]] = {role: {} for role in ROLES}
        self.inflight: dict[str, int] = defaultdict(int)
        self.reports: dict[str, protocol.NodeStatus] = {}      # node id -> its latest own report
        # node id -> {request id: work} sent since that node's last report and not finished since
        self.sent: dict[str, dict[str, float]] = defaultdict(dict)
        self.prefixes = {role: PrefixIndex() for role in ("prefill", "colocated")}
        self.hash_unseen_prefixes = False   # one of several router processes: see routing.affine_node
        self.affinity_picks: dict[str, int] = defaultdict(int)  # role -> picks made for cached inputs
        self._rr = {role: itertools.count() for role in ROLES}
        self._redis_run_id = ""
        self._redis_restarted_at = -float("inf")   # time.monotonic() when a Redis restart was seen

    def refresh(self) -> None:
        """Re-read the pools; what the router kept about nodes that are gone (their prefix blocks,
        reports, work sent) goes with them."""
        before = {node_id for nodes in self.nodes.values() for node_id in nodes}
        run_id = self.registry.server_run_id()
        if self._redis_run_id and run_id != self._redis_run_id:
            self._redis_restarted_at = time.monotonic()
        self._redis_run_id = run_id
        since_restart = time.monotonic() - self._redis_restarted_at
        for role in ROLES:
            fresh = {n.node_id: n for n in self.registry.list_nodes(role)}
            kept = {node_id: n for node_id, n in self.nodes[role].items()
                    if node_id not in fresh and since_restart < (n.ttl_s or DEFAULT_TTL_S)}
            self.nodes[role] = fresh | kept
        gone = before - {node_id for nodes in self.nodes.values() for node_id in nodes}
        if gone:
            for role, index in self.prefixes.items():
                index.forget(set(self.nodes[role]))
            for node_id in gone:
                self.reports.pop(node_id, None)
                self.sent.pop(node_id, None)

    def reported(self, status: protocol.NodeStatus) -> None:
        self.reports[status.node] = status
        self.sent[status.node] = {}

    def alive(self, role: str, node_id: str) -> bool:
        return node_id in self.nodes[role]

    def still_up(self, info: NodeInfo) -> bool:
        """The very process `info` was read from is registered (a node restarted under the same id
        is another process: what the old one held is gone)."""
        current = self.nodes[info.role].get(info.node_id)
        return current is not None and current.started_at == info.started_at

    def sizes(self) -> dict[str, int]:
        """Nodes that take new work, per pool (draining ones finish theirs but are not counted)."""
        return {role: sum(1 for n in nodes.values() if not n.draining) for role, nodes in self.nodes.items()}

    def pick(self, role: str, accept: Callable[[NodeInfo], bool] | None = None, work: Work | None = None) -> NodeInfo:
        live = sorted((n for n in self.nodes[role].values() if not n.draining), key=lambda n: n.node_id)
        candidates = [n for n in live if accept is None or accept(n)]
        if not candidates:
            raise NoNodeError(f"no {role} node is available" if not live else
                              f"no {role} node fits this request")
        policy = self.policies[role]
        if policy == "round_robin":
            chosen = candidates[next(self._rr[role]) % len(candidates)]
        else:
            chosen = min(candidates, key=lambda n: (self.load(role, n.node_id), self.inflight[n.node_id], n.node_id))
            preferred = self.preferred(role, work, [n.node_id for n in candidates])
            if preferred is not None and balanced(self.load(role, preferred), self.load(role, chosen.node_id),
                                                  work.amount(role)):
                chosen = self.nodes[role][preferred]
                self.affinity_picks[role] += 1
        return chosen

    def assign(self, role: str, node: NodeInfo, work: Work, rid: str = "") -> None:
        """The request goes to `node`: its work counts there until the node's next report or the
        request's end, and (prefix pools) its blocks are remembered there."""
        self.sent[node.node_id][rid] = work.amount(role) if role != "decode" else work.prompt_tokens
        if role in self.prefixes:
            self.prefixes[role].record(work.block_hashes, node.node_id)

    def preferred(self, role: str, work: Work | None, candidates: list[str]) -> str | None:
        """The node cache_aware would send `work` to for its cached inputs (None: no such node)."""
        if self.policies[role] != "cache_aware" or work is None or not candidates:
            return None
        return affine_node(role, work, candidates, self.prefixes.get(role), self.hash_unseen_prefixes)

    def load(self, role: str, node_id: str) -> float:
        """Queued work on the node: its last report plus what this router sent it since (decode:
        the fraction of its KV pages in use, the prompts sent since counted in)."""
        status = self.reports.get(node_id)
        if status is None:
            return sum(self.sent[node_id].values())
        if role == "decode":
            tokens = max(1, status.pages_total * max(1, status.page_size))
            return (status.pages_total - status.pages_free) / max(1, status.pages_total) \
                + sum(self.sent[node_id].values()) / tokens
        return status.queues.get(LOAD_QUEUE[role], 0) + sum(self.sent[node_id].values())

    def begin(self, node_id: str) -> None:
        self.inflight[node_id] += 1

    def end(self, node_id: str, rid: str = "") -> None:
        """The request is over on the node: what was sent for it no longer waits there (a report
        taken meanwhile counted it, and the next one will not)."""
        self.inflight[node_id] = max(0, self.inflight[node_id] - 1)
        self.sent[node_id].pop(rid, None)
