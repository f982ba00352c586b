"""Rendezvous rooms in Redis: one per request transfer, ``epd:room:{rid}``, always with a TTL.

A room records who sends and who receives one request's data (embeddings E→P, KV P→D),
whether each side is ready, and the first failure. Lifecycle::

    open_room ──▶ OPEN ──mark_ready(sender) + mark_ready(receiver)──▶ READY ──close──▶ (gone)
                    │                                                   │
                    └──────────mark_failed (either side, any time)──────┴──▶ FAILED ──close──▶ (gone)

- The router opens the room when it picks the nodes.
- The receiver marks itself ready once it has pages and receive buffers (its `info` may
  carry what the sender needs, e.g. its transport address); the sender once it has data.
- Either side (or the router) writes a failure with reason, stage and node; the first one
  wins, and the other side sees it on its next `get`. Aborts are also sent as messages:
  the room is the durable record, not the fast path.
- Every write refreshes the TTL; a write to a room that expired or was closed returns False
  and does not recreate it, so the caller knows to abort.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from kv_transfer.redis_util import create_if_absent, to_str_dict, update_first_wins, update_if_exists

KEY_PREFIX = "epd:room"
Party = Literal["sender", "receiver"]


def room_key(rid: str) -> str:
    if not rid:
        raise ValueError("empty request id")
    return f"{KEY_PREFIX}:{rid}"


class RoomState(enum.StrEnum):
    OPEN = "open"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class RoomFailure:
    reason: str
    stage: str  # e.g. "prefill", "kv_transfer", "decode_admit"
    node: str  # node id that reported it
    at: float  # unix time


@dataclass(frozen=True)
class Room:
    rid: str
    sender: str  # node id of the sending side
    receiver: str  # node id of the receiving side
    created_at: float
    sender_ready: bool = False
    receiver_ready: bool = False
    sender_info: dict[str, Any] = field(default_factory=dict)
    receiver_info: dict[str, Any] = field(default_factory=dict)
    failure: RoomFailure | None = None

    @property
    def state(self) -> RoomState:
        if self.failure is not None:
            return RoomState.FAILED
        if self.sender_ready and self.receiver_ready:
            return RoomState.READY
        return RoomState.OPEN

    @classmethod
    def from_fields(cls, rid: str, f: dict[str, str]) -> Room:
        failure = None
        if "fail_reason" in f:
            failure = RoomFailure(
                f["fail_reason"], f.get("fail_stage", ""), f.get("fail_node", ""), float(f.get("fail_at", 0))
            )
        return cls(
            rid=rid,
            sender=f.get("sender", ""),
            receiver=f.get("receiver", ""),
            created_at=float(f.get("created_at", 0)),
            sender_ready=f.get("sender_ready") == "1",
            receiver_ready=f.get("receiver_ready") == "1",
            sender_info=json.loads(f.get("sender_info", "{}")),
            receiver_info=json.loads(f.get("receiver_info", "{}")),
            failure=failure,
        )


class RoomStore:
    """CRUD over ``epd:room:{rid}``; every write sets the TTL (`ttl_s`)."""

    def __init__(self, client: redis.Redis, ttl_s: float = 120.0) -> None:
        self._client = client
        self.ttl_s = ttl_s

    def open_room(self, rid: str, sender: str, receiver: str) -> Room:
        """Create the room; ValueError if one with this rid is still open."""
        now = time.time()
        fields = {"sender": sender, "receiver": receiver, "created_at": now}
        if not create_if_absent(self._client, room_key(rid), fields, self.ttl_s):
            raise ValueError(f"room {rid!r} already exists")
        return Room(rid, sender, receiver, now)

    def mark_ready(self, rid: str, party: Party, info: Mapping[str, Any] | None = None) -> bool:
        """Mark one side ready, publishing `info` (JSON-able) to the other; False if the room is gone."""
        if party not in ("sender", "receiver"):
            raise ValueError(f"party must be 'sender' or 'receiver', got {party!r}")
        fields = {f"{party}_ready": "1", f"{party}_info": json.dumps(dict(info or {}))}
        return update_if_exists(self._client, room_key(rid), fields, self.ttl_s)

    def mark_failed(self, rid: str, reason: str, stage: str, node: str) -> bool:
        """Record a failure unless one is recorded already; False if the room is gone."""
        fields = {"fail_reason": reason, "fail_stage": stage, "fail_node": node, "fail_at": time.time()}
        return update_first_wins(self._client, room_key(rid), fields, self.ttl_s) != 0

    def get(self, rid: str) -> Room | None:
        raw = self._client.hgetall(room_key(rid))
        return Room.from_fields(rid, to_str_dict(raw)) if raw else None

    def get_many(self, rids: list[str]) -> dict[str, Room | None]:
        """`get` of each rid in one round trip (a node's loop checking all its waiting requests)."""
        with self._client.pipeline(transaction=False) as pipe:
            for rid in rids:
                pipe.hgetall(room_key(rid))
            raws = pipe.execute()
        return {rid: Room.from_fields(rid, to_str_dict(raw)) if raw else None
                for rid, raw in zip(rids, raws, strict=True)}

    def close(self, rid: str) -> None:
        """Delete the room (idempotent)."""
        self._client.delete(room_key(rid))
