"""Pool-wide gauges for /metrics, built from the `NodeStatus` each node reports about itself.

The disaggregated router asks every live node for its status once per pool refresh (a
`StatusRequest` on the node's control socket) and keeps the latest answer per node. `gauges()`
folds those answers into the keys `Backend.stats()` returns:

- `kv_cache_usage_perc`: fraction of the decode pool's pages in use (vLLM's meaning: the pages
  that bound how many requests can decode at once), the colocated pool's where there is no decode
  pool;
- `kv_cache_pages_in_use` / `kv_cache_pages_total`: summed over every node with a KV pool;
- `num_requests_waiting`: requests queued on a node, not yet being computed on (encoder: for the
  vision tower; prefill: for embeddings or for its scheduler; decode: for pages; colocated: for its
  pixels or its scheduler), also per pool;
- `num_preemptions_total`: requests the nodes' schedulers pushed back for want of pages (vLLM's
  counter; summed over the nodes that answered, each counting since it started);
- per pool (`name|pool` keys, rendered with a `pool` label): requests waiting, pages in use and total, nodes
  whose integrity check fails, nodes that did not answer, and the messages the nodes refused
  (unauthenticated, malformed: counted since each started).
"""

from __future__ import annotations

from dataclasses import dataclass

from epd import protocol

WAITING_QUEUES = {"encoder": ("pending",), "prefill": ("awaiting_embeddings", "scheduler_waiting"),
                  "decode": ("awaiting_pages",), "colocated": ("preparing", "scheduler_waiting")}


@dataclass
class NodeReport:
    role: str
    status: protocol.NodeStatus | None      # None: the node did not answer in time


def gauges(reports: dict[str, NodeReport]) -> dict[str, float]:
    out: dict[str, float] = {"kv_cache_pages_in_use": 0.0, "kv_cache_pages_total": 0.0, "num_requests_waiting": 0.0,
                             "num_preemptions_total": 0.0}
    for role in WAITING_QUEUES:
        mine = [r.status for r in reports.values() if r.role == role]
        answered = [s for s in mine if s is not None]
        in_use = float(sum(s.pages_total - s.pages_free for s in answered))
        total = float(sum(s.pages_total for s in answered))
        out[f"node_unresponsive|{role}"] = float(len(mine) - len(answered))
        out[f"node_integrity_failures|{role}"] = float(sum(not s.integrity_ok for s in answered))
        out[f"node_rejected_messages|{role}"] = float(sum(s.rejected_messages for s in answered))
        waiting = float(sum(s.queues.get(q, 0) for s in answered for q in WAITING_QUEUES[role]))
        out[f"node_requests_waiting|{role}"] = waiting
        out["num_requests_waiting"] += waiting
        if role == "encoder":
            continue
        out[f"node_kv_pages_in_use|{role}"] = in_use
        out[f"node_kv_pages_total|{role}"] = total
        out["kv_cache_pages_in_use"] += in_use
        out["kv_cache_pages_total"] += total
        out["num_preemptions_total"] += sum(s.preemptions for s in answered)
        if role == "decode" or (role == "colocated" and total and not out.get("kv_cache_usage_perc")):
            out["kv_cache_usage_perc"] = in_use / total if total else 0.0
    return out
