"""/metrics over several router worker processes (`epd router --api-server-count N`).

A scrape reaches one worker; it answers for all of them. Each worker writes a snapshot of what it
counted itself (its counters and histograms, its requests in flight, its affinity picks) to a
directory the workers share: within 0.2 s of a change, and at each scrape before reading the others'. The
scraped worker renders the sum of every snapshot (its own fresh one included) with the gauges
every worker sees alike (the nodes' reports: waiting, KV pages, pool sizes) from its own backend.
A worker's snapshot only grows, and each scrape writes the scraped worker's before reading, so a
counter never goes down from one scrape to the next, whichever worker answers.

Files are JSON, written whole then renamed (a reader never sees half of one).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from router.metrics import Counter, Histogram, RouterMetrics

# backend stats each worker has for itself (its requests in flight, its routing counters)
LOCAL_SUMS = ("routing_affinity_picks_total|", "requests_in_flight")


def local_stats(stats: dict[str, float]) -> dict[str, float]:
    """What this worker adds to the sums."""
    return {key: value for key, value in stats.items() if key.startswith(LOCAL_SUMS)}


def snapshot(metrics: RouterMetrics, local: dict[str, float]) -> dict[str, Any]:
    families: dict[str, Any] = {}
    for family in metrics.families():
        if isinstance(family, Counter):
            families[family.names[0]] = [[list(map(list, k)), v] for k, v in family.values.items()]
        else:
            families[family.names[0]] = [[list(map(list, k)), family.counts[k], family.sums[k]]
                                         for k in family.counts]
    return {"families": families, "local": local}


def merged(metrics: RouterMetrics, snapshots: list[dict[str, Any]]) -> RouterMetrics:
    """A copy of `metrics` (its series and buckets) holding the sum of `snapshots`."""
    out = copy.deepcopy(metrics)
    by_name = {family.names[0]: family for family in out.families()}
    for family in by_name.values():
        if isinstance(family, Counter):
            family.values.clear()
        else:
            family.counts.clear()
            family.sums.clear()
    for snap in snapshots:
        for name, rows in snap["families"].items():
            family = by_name.get(name)
            for row in rows if family is not None else ():
                labels = tuple(tuple(pair) for pair in row[0])
                if isinstance(family, Counter):
                    family.values[labels] += row[1]
                else:
                    _add_histogram(family, labels, row[1], row[2])
    return out


def _add_histogram(family: Histogram, labels: tuple, counts: list[int], total: float) -> None:
    mine = family.counts.setdefault(labels, [0] * (len(family.bounds) + 1))
    for i, n in enumerate(counts[:len(mine)]):
        mine[i] += n
    family.sums[labels] += total


def merged_stats(stats: dict[str, float], snapshots: list[dict[str, Any]]) -> dict[str, float]:
    """The backend's gauges with the per-worker parts summed over the workers."""
    out = dict(stats)
    for key in {k for snap in snapshots for k in snap["local"] if k.startswith(LOCAL_SUMS)}:
        out[key] = sum(snap["local"].get(key, 0.0) for snap in snapshots)
    if "requests_in_flight" in out:
        waiting = stats.get("num_requests_waiting", 0.0)
        out["num_requests_running"] = float(max(0.0, out["requests_in_flight"] - waiting))
    return out


class SnapshotDir:
    def __init__(self, path: str, worker: int) -> None:
        self.path, self.worker = path, worker
        self._last = ""
        os.makedirs(path, exist_ok=True)

    def write(self, snap: dict[str, Any]) -> None:
        self._write(json.dumps(snap))

    def write_if_changed(self, snap: dict[str, Any]) -> None:
        text = json.dumps(snap)
        if text != self._last:
            self._write(text)

    def _write(self, text: str) -> None:
        final = os.path.join(self.path, f"worker-{self.worker}.json")
        partial = f"{final}.{os.getpid()}.tmp"
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, final)
        self._last = text

    def read_all(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(os.listdir(self.path)):
            if name.startswith("worker-") and name.endswith(".json"):
                try:
                    with open(os.path.join(self.path, name)) as f:
                        out.append(json.load(f))
                except (OSError, ValueError):
                    continue   # a worker that is gone mid-rename: its next write replaces it
        return out
