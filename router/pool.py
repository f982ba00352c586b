"""The router's view of the node pools, refreshed from Redis, and the routing policies.

`PoolView.refresh()` re-reads `epd:node:{role}:*` (a node that registers is picked within one
refresh interval; one whose key expired is gone after the next refresh). `pick(role)` applies the
policy: "round_robin" cycles through live nodes; "least_load" takes the node with the fewest
requests, counting both its last heartbeat load and what this router sent it since.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable

import redis

from kv_transfer.auth import ClusterSecret
from kv_transfer.registry import NodeInfo, NodeRegistry

ROLES = ("encoder", "prefill", "decode")
POLICIES = ("round_robin", "least_load")


class NoNodeError(RuntimeError):
    pass


class PoolView:
    def __init__(self, client: redis.Redis, secret: ClusterSecret, policy: str = "least_load") -> None:
        """Only nodes whose registry entry carries the cluster's signature are seen."""
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.registry = NodeRegistry(client, secret)
        self.policy = policy
        self.nodes: dict[str, dict[str, NodeInfo]] = {role: {} for role in ROLES}
        self.inflight: dict[str, int] = defaultdict(int)
        self._rr = {role: itertools.count() for role in ROLES}

    def refresh(self) -> None:
        for role in ROLES:
            self.nodes[role] = {n.node_id: n for n in self.registry.list_nodes(role)}

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

    def pick(self, role: str, accept: Callable[[NodeInfo], bool] | None = None) -> NodeInfo:
        live = sorted((n for n in self.nodes[role].values() if not n.draining), key=lambda n: n.node_id)
        candidates = [n for n in live if accept is None or accept(n)]
        if not candidates:
            raise NoNodeError(f"no {role} node is available" if not live else
                              f"no {role} node fits this request")
        if self.policy == "round_robin":
            return candidates[next(self._rr[role]) % len(candidates)]
        return min(candidates, key=lambda n: (n.load + self.inflight[n.node_id], n.node_id))

    def begin(self, node_id: str) -> None:
        self.inflight[node_id] += 1

    def end(self, node_id: str) -> None:
        self.inflight[node_id] = max(0, self.inflight[node_id] - 1)
