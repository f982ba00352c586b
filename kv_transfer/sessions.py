"""Request sessions in Redis: ``epd:req:{rid}``, the durable trace of one request, with a TTL.

Lifecycle: the router `create`s the session when it accepts a request (stage QUEUED) and
`assign`s the chosen nodes; each node calls `advance` as the request enters its stage
(the time of entry is kept per stage, so latency per stage can be read back); the decode
node advances to FINISHED, or anyone calls `fail` with the error. Every write refreshes the
TTL; writes to a session that expired return False and do not recreate it. Sessions are for
observability and recovery decisions, never on the data path.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from kv_transfer.redis_util import create_if_absent, to_str_dict, update_if_exists

KEY_PREFIX = "epd:req"


def session_key(rid: str) -> str:
    if not rid:
        raise ValueError("empty request id")
    return f"{KEY_PREFIX}:{rid}"


class Stage(enum.StrEnum):
    """Stages in the order a request passes them."""

    QUEUED = "queued"
    ENCODING = "encoding"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class Session:
    rid: str
    stage: Stage
    nodes: dict[str, str] = field(default_factory=dict)  # role -> node id
    entered: dict[Stage, float] = field(default_factory=dict)  # stage -> unix time entered
    error: str | None = None
    failed_stage: Stage | None = None  # the stage the request was in when it failed

    @classmethod
    def from_fields(cls, rid: str, f: dict[str, str]) -> Session:
        nodes = {k.removeprefix("node:"): v for k, v in f.items() if k.startswith("node:")}
        entered = {Stage(k.removeprefix("t:")): float(v) for k, v in f.items() if k.startswith("t:")}
        failed = f.get("failed_stage")
        return cls(rid, Stage(f["stage"]), nodes, entered, f.get("error"), Stage(failed) if failed else None)


class SessionStore:
    """CRUD over ``epd:req:{rid}``; every write sets the TTL (`ttl_s`)."""

    def __init__(self, client: redis.Redis, ttl_s: float = 600.0) -> None:
        self._client = client
        self.ttl_s = ttl_s

    def create(self, rid: str, nodes: Mapping[str, str] | None = None) -> None:
        """Start a session in QUEUED; ValueError if `rid` is already live."""
        fields: dict[str, str | float] = {"stage": Stage.QUEUED.value, f"t:{Stage.QUEUED}": time.time()}
        fields.update({f"node:{role}": node for role, node in (nodes or {}).items()})
        if not create_if_absent(self._client, session_key(rid), fields, self.ttl_s):
            raise ValueError(f"session {rid!r} already exists")

    def assign(self, rid: str, role: str, node_id: str) -> bool:
        """Record the node serving `role` for this request; False if the session is gone."""
        return update_if_exists(self._client, session_key(rid), {f"node:{role}": node_id}, self.ttl_s)

    def advance(self, rid: str, stage: Stage) -> bool:
        """Enter `stage` now; False if the session is gone."""
        stage = Stage(stage)
        fields = {"stage": stage.value, f"t:{stage}": time.time()}
        return update_if_exists(self._client, session_key(rid), fields, self.ttl_s)

    def fail(self, rid: str, error: str) -> bool:
        """Move to FAILED with `error`, remembering the stage it failed in; False if gone."""
        current = self.get(rid)
        if current is None:
            return False
        failed_in = current.failed_stage if current.stage is Stage.FAILED else current.stage
        fields = {
            "stage": Stage.FAILED.value,
            f"t:{Stage.FAILED}": time.time(),
            "error": error,
            "failed_stage": (failed_in or Stage.FAILED).value,
        }
        return update_if_exists(self._client, session_key(rid), fields, self.ttl_s)

    def get(self, rid: str) -> Session | None:
        raw = self._client.hgetall(session_key(rid))
        return Session.from_fields(rid, to_str_dict(raw)) if raw else None

    def delete(self, rid: str) -> None:
        self._client.delete(session_key(rid))
