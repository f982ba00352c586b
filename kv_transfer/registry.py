"""Node registry in Redis: which encoder / prefill / decode nodes are alive, and how to reach them.

Key ``epd:node:{role}:{node_id}``, a hash with the fields of `NodeInfo`, always with a TTL.
Lifecycle:

1. A node process calls ``lease = NodeRegistry(client, secret).register(info, ttl_s)`` once it
   listens: the record is written, signed with the cluster secret (`kv_transfer.auth`), and a
   daemon heartbeat thread rewrites it (with the latest load, see `NodeLease.update_load`) every
   ``ttl_s / 3`` seconds, refreshing the TTL, with any keys the node asked to keep written (its KV
   layout, which a Redis restart would otherwise lose).
2. Readers (the router, a node picking a peer) call `list_nodes(role)`: only keys that still
   exist and carry the cluster's signature are returned, so a node that died, hung or lost Redis
   drops out once its TTL runs out — no cleanup needed — and an entry written by anyone without
   the secret is never routed to.
3. On orderly shutdown the node calls `lease.deregister()` (stop heartbeating, delete the key).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import redis

from kv_transfer.auth import ClusterSecret
from kv_transfer.redis_util import RedisWatch, to_str_dict, write_hash

logger = logging.getLogger(__name__)

KEY_PREFIX = "epd:node"


def node_key(role: str, node_id: str) -> str:
    for name, part in (("role", role), ("node_id", node_id)):
        if not part or ":" in part or "*" in part:
            raise ValueError(f"{name} must be non-empty without ':' or '*', got {part!r}")
    return f"{KEY_PREFIX}:{role}:{node_id}"


ALSO_WRITE_TTL_S = 3600   # keys a lease writes again at every heartbeat (layouts)


@dataclass(frozen=True)
class NodeInfo:
    """What a node publishes about itself. Addresses are "host:port" strings ("" if none)."""

    role: str  # "encoder" | "prefill" | "decode" (any name without ':')
    node_id: str
    zmq: str = ""
    ucx: str = ""
    http: str = ""
    model: str = ""
    layout_hash: str = ""
    capacity: int = 0  # e.g. KV pages, or max batch; the role decides
    load: float = 0.0  # e.g. running + waiting requests; refreshed by the heartbeat
    started_at: float = 0.0  # unix time
    heartbeat_at: float = 0.0  # unix time of the last write
    kv_ipc: str = ""  # where its KV pool lives for CUDA IPC (cuda_ipc.IpcCapability.to_wire; ipc_pairable), else ""
    max_context: int = 0  # prompt + output tokens a request may have here (prefill, decode); 0 = unknown
    draining: int = 0  # 1: finishing what it holds before it exits; routers send it nothing new
    ttl_s: float = 0.0  # seconds its record lives without a heartbeat (0: not published)
    ucx_ranks: str = ""  # tensor parallel: ranks 1..N-1's transport addresses, comma-separated (rank by rank)

    def rank_addresses(self) -> list[str]:
        """Ranks 1..N-1's transport addresses (a node of N tensor-parallel processes), else []."""
        return [a for a in self.ucx_ranks.split(",") if a]

    def to_fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> NodeInfo:
        """Parse a stored hash; unknown fields (from a newer node) are ignored."""
        kwargs: dict[str, str | int | float] = {}
        for f in dataclasses.fields(cls):
            if f.name not in fields:
                continue
            raw = fields[f.name]
            kwargs[f.name] = int(raw) if f.type == "int" else float(raw) if f.type == "float" else raw
        return cls(**kwargs)  # type: ignore[arg-type]


class NodeLease:
    """A registered node's heartbeat. Created by `NodeRegistry.register`."""

    def __init__(self, client: redis.Redis, info: NodeInfo, ttl_s: float, interval_s: float,
                 secret: ClusterSecret | None = None, also_write: dict[str, str] | None = None) -> None:
        self._client = client
        self._info = info
        self._secret = secret
        self._also_write = dict(also_write or {})   # written again at every beat (a Redis restart loses them)
        self._ttl_s = ttl_s
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.key = node_key(info.role, info.node_id)
        self._beat()  # the first write is synchronous: register() fails loudly if Redis is down
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.key}", daemon=True)
        self._thread.start()

    @property
    def info(self) -> NodeInfo:
        with self._lock:
            return self._info

    def update_load(self, load: float) -> None:
        """Record the current load; published at the next heartbeat (no Redis call here)."""
        with self._lock:
            self._info = dataclasses.replace(self._info, load=float(load))

    def set_draining(self) -> None:
        """Publish now that the node is draining (routers stop picking it; what it holds goes on)."""
        with self._lock:
            self._info = dataclasses.replace(self._info, draining=1)
        try:
            self._beat()
        except redis.RedisError as exc:   # the next heartbeat writes it
            logger.warning("could not publish the drain now: %s", exc)

    def stop(self) -> None:
        """Stop heartbeating; the key then expires by itself within the TTL."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self._interval_s + 5.0)

    def deregister(self) -> None:
        """Stop heartbeating and remove the record now."""
        self.stop()
        try:
            self._client.delete(self.key)
        except redis.RedisError as exc:
            logger.warning("could not delete %s (it will expire): %s", self.key, exc)

    def _beat(self) -> None:
        with self._lock:
            self._info = dataclasses.replace(self._info, heartbeat_at=time.time())
            fields = self._info.to_fields()
        if self._secret is not None:
            fields["sig"] = self._secret.sign_fields(fields)
        write_hash(self._client, self.key, fields, self._ttl_s)
        for key, value in self._also_write.items():
            self._client.set(key, value, ex=ALSO_WRITE_TTL_S)

    def _run(self) -> None:
        # Keep trying: the key expires if Redis stays unreachable, which is the point; once it is
        # back, the next beat writes the record (and the kept keys) again. Logged once each way.
        watch = RedisWatch(f"heartbeat of {self.key}")
        while not self._stop.wait(self._interval_s):
            watch.call(self._beat)


class NodeRegistry:
    """Reads and writes ``epd:node:*`` records."""

    def __init__(self, client: redis.Redis, secret: ClusterSecret | None = None) -> None:
        """With `secret`, entries are signed when written and read only when their signature holds
        (an entry written without the cluster secret is never listed); without, neither."""
        self._client = client
        self._secret = secret
        self._unsigned: set[str] = set()   # keys already logged as unsigned

    def register(self, info: NodeInfo, ttl_s: float = 10.0, interval_s: float | None = None,
                 also_write: dict[str, str] | None = None) -> NodeLease:
        """Publish `info` and keep it alive with a heartbeat every `interval_s` (ttl_s / 3);
        `also_write` keys are written at each heartbeat too."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        interval = interval_s if interval_s is not None else ttl_s / 3
        if not 0 < interval < ttl_s:
            raise ValueError(f"heartbeat interval {interval}s must be in (0, ttl {ttl_s}s)")
        info = dataclasses.replace(info, started_at=info.started_at or time.time(), ttl_s=ttl_s)
        return NodeLease(self._client, info, ttl_s, interval, self._secret, also_write)

    def remove(self, role: str, node_id: str) -> None:
        """Delete a node's record now (its launcher saw the process die: no need to wait for the TTL)."""
        self._client.delete(node_key(role, node_id))

    def server_run_id(self) -> str:
        """The Redis server's run id: it changes when Redis restarts (and every record is gone)."""
        return str(self._client.info("server").get("run_id", ""))

    def get(self, role: str, node_id: str) -> NodeInfo | None:
        raw = self._client.hgetall(node_key(role, node_id))
        return self._parse(node_key(role, node_id), to_str_dict(raw)) if raw else None

    def _parse(self, key: str, fields: dict[str, str]) -> NodeInfo | None:
        if self._secret is not None and not self._secret.fields_signed(fields):
            if key not in self._unsigned:
                self._unsigned.add(key)
                logger.warning("ignoring %s: not signed with the cluster secret", key)
            return None
        return NodeInfo.from_fields(fields)

    def list_nodes(self, role: str) -> list[NodeInfo]:
        """Live nodes of `role`, sorted by node_id."""
        node_key(role, "x")  # validates role
        keys = list(self._client.scan_iter(match=f"{KEY_PREFIX}:{role}:*", count=500))
        if not keys:
            return []
        with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            rows = pipe.execute()
        # A key may expire between SCAN and HGETALL: it comes back empty and is skipped.
        nodes = [node for key, row in zip(keys, rows, strict=True) if row
                 and (node := self._parse(str(key), to_str_dict(row))) is not None]
        return sorted(nodes, key=lambda n: n.node_id)
