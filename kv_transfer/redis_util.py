"""Small Redis helpers shared by the registry, room and session stores.

Lifecycle: a process builds one client with `connect(url)` at start-up and hands it to the
stores. Every write helper here sets the key's TTL in the same atomic step as the data, so
no key ever lives without one; updates go through `update_if_exists`, so a late write to an
expired or closed key cannot resurrect it without its other fields.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import redis

logger = logging.getLogger(__name__)

# KEYS[1] = key; ARGV[1] = ttl in ms; ARGV[2..] = field, value pairs.
_CREATE_IF_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Like _UPDATE_IF_EXISTS, but only when the field named by ARGV[2] is not set yet: the
# first writer wins (e.g. the first failure of a room). Returns 0 gone, 1 written, 2 kept.
_UPDATE_IF_FIELD_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 2 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client that returns str, with bounded socket timeouts (Redis is never on the data path)."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
    )


class RedisWatch:
    """Calls to Redis that may fail while it is down: `call` returns `default` then, and the log
    says so once when Redis goes away and once when it is back (no line per failed call)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.up = True

    def call(self, fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        try:
            result = fn(*args)
        except redis.RedisError as e:
            if self.up:
                logger.warning("%s: Redis is unavailable (%s: %s); going on without it", self.what,
                               type(e).__name__, e)
            self.up = False
            return default
        if not self.up:
            logger.info("%s: Redis is back", self.what)
        self.up = True
        return result


def to_str_dict(raw: Mapping[Any, Any]) -> dict[str, str]:
    """HGETALL result as str -> str, whether the client decodes responses or not."""

    def s(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    return {s(k): s(v) for k, v in raw.items()}


def _flatten(fields: Mapping[str, str | int | float]) -> list[str]:
    if not fields:
        raise ValueError("no fields to write")
    out: list[str] = []
    for name, value in fields.items():
        out += [name, str(value)]
    return out


def _ttl_ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"TTL must be positive, got {ttl_s}")
    return max(1, int(ttl_s * 1000))


def write_hash(client: redis.Redis, key: str, fields: Mapping[str, str | int | float], ttl_s: float) -> None:
    """Replace the hash at `key` and set its TTL, atomically."""
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
        pipe.pexpire(key, _ttl_ms(ttl_s))
        pipe.execute()


def create_if_absent(client: redis.Redis, key: str, fields: Mapping[str, str | int | float], ttl_s: float) -> bool:
    """Create the hash with a TTL unless `key` exists; True if created."""
    return bool(client.eval(_CREATE_IF_ABSENT, 1, key, _ttl_ms(ttl_s), *_flatten(fields)))


def update_if_exists(client: redis.Redis, key: str, fields: Mapping[str, str | int | float], ttl_s: float) -> bool:
    """Set fields and refresh the TTL if `key` exists; False if it expired or was deleted."""
    return bool(client.eval(_UPDATE_IF_EXISTS, 1, key, _ttl_ms(ttl_s), *_flatten(fields)))


def update_first_wins(client: redis.Redis, key: str, fields: Mapping[str, str | int | float], ttl_s: float) -> int:
    """Write `fields` unless their first field is already set: 0 gone, 1 written, 2 kept."""
    return int(client.eval(_UPDATE_IF_FIELD_ABSENT, 1, key, _ttl_ms(ttl_s), *_flatten(fields)))
