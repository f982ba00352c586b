"""`epd serve` keeps serving: what dies is started again, the rest goes on.

`Supervisor.check()` (called from serve's loop a few times a second) looks at every node, the
router and the private Redis:
- a node that exited is started again under the same id and arguments after a backoff (1, 2, 4,
  8, 16 s for its successive crashes), logged on the console; the requests it held fail on their
  own (the router sees the process gone: its registration expires or changes) and the other
  nodes keep serving. A node that exits `MAX_CRASHES` times within `WINDOW_S` is given up on,
  with a message saying so and where its log is; its pool serves with the nodes it has left (the
  router's /health says 503 while a pool is empty).
- the router is restarted the same way (same port); the private Redis too (same port and
  password: nodes and router write their registrations again by themselves).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from deploy.procs import Cluster, NodeProc
from deploy.redis_proc import PrivateRedis
from kv_transfer.registry import NodeRegistry

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)
MAX_CRASHES = 5
WINDOW_S = 120.0


@dataclass
class _Record:
    crashes: list[float] = field(default_factory=list)   # when it was seen dead (monotonic)
    due_at: float | None = None                           # when to start it again
    given_up: bool = False

    def crashed(self, now: float) -> bool:
        """Note a crash; False once it crashed too often to start again."""
        self.crashes = [t for t in self.crashes if now - t < WINDOW_S] + [now]
        if len(self.crashes) >= MAX_CRASHES:
            self.given_up = True
            return False
        self.due_at = now + BACKOFF_S[min(len(self.crashes), len(BACKOFF_S)) - 1]
        return True


class Supervisor:
    def __init__(self, cluster: Cluster, private_redis: PrivateRedis | None,
                 start_router: Callable[[], subprocess.Popen],
                 say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster, self.redis, self.start_router = cluster, private_redis, start_router
        self.router = start_router()
        self.say, self.clock = say, clock
        self.records: dict[str, _Record] = {}

    def check(self) -> None:
        now = self.clock()
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is not None:
            self._restart_redis()
        for node in list(self.cluster.nodes):
            if not node.alive():
                self._node_down(node, now)
        if self.router.poll() is not None:
            record = self.records.setdefault("router", _Record())
            if self._due("the router", record, self.router.returncode, now):
                self.router = self.start_router()

    def _node_down(self, node: NodeProc, now: float) -> None:
        record = self.records.setdefault(node.node_id, _Record())
        if record.due_at is None and not record.given_up:   # just seen dead: the router drops it now
            self._forget(node)
        if self._due(f"{node.role} node {node.node_id}", record, node.proc.returncode, now, node.log_path):
            self.cluster.restart(node)

    def _due(self, what: str, record: _Record, code: int | None, now: float, log_path: str = "") -> bool:
        """Whether to start `what` again now (noting its crash the first time it is seen down)."""
        if record.given_up:
            return False
        if record.due_at is None:
            where = f" (log: {log_path})" if log_path else ""
            if not record.crashed(now):
                self.say(f"epd serve: {what} exited {MAX_CRASHES} times in {WINDOW_S:.0f}s; not starting it "
                         f"again{where}")
                return False
            self.say(f"epd serve: {what} exited with {code}; starting it again in "
                     f"{record.due_at - now:.0f}s{where}")
        if now < record.due_at:
            return False
        record.due_at = None
        return True

    def _forget(self, node: NodeProc) -> None:
        """Remove the dead node's registration, so that the router stops routing to it on its next
        refresh (0.5 s) instead of after its heartbeat TTL, and fails what it held."""
        try:
            NodeRegistry(redis.Redis.from_url(self.cluster.redis_url)).remove(node.role, node.node_id)
        except redis.RedisError as e:
            self.say(f"epd serve: could not remove {node.node_id} from the registry ({e}); it expires by itself")

    def _restart_redis(self) -> None:
        self.say("epd serve: the private Redis exited; starting it again (same port and password)")
        try:
            self.redis.start()   # type: ignore[union-attr]
        except RuntimeError as e:
            self.say(f"epd serve: {e}; trying again")

    @property
    def gave_up_on_router(self) -> bool:
        return self.records.get("router", _Record()).given_up
