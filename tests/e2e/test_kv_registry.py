"""Redis state plane against a real redis-server: live nodes, rooms and sessions, all with TTLs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis_server import RedisServer  # tests/ is on sys.path (tests/conftest.py)

from kv_transfer.redis_util import connect
from kv_transfer.registry import NodeInfo, NodeRegistry
from kv_transfer.rooms import RoomState, RoomStore
from kv_transfer.sessions import SessionStore, Stage


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = connect(redis_url)
    c.flushdb()
    yield c
    c.close()


def node(role: str, node_id: str, **kw: object) -> NodeInfo:
    return NodeInfo(
        role=role,
        node_id=node_id,
        zmq="tcp://127.0.0.1:5555",
        ucx="127.0.0.1:4000",
        http="127.0.0.1:8000",
        model="tiny-qwen2-vl",
        layout_hash="abcd",
        capacity=512,
        **kw,
    )  # type: ignore[arg-type]


def wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_node_stays_while_heartbeating_and_drops_out_when_it_stops(client: redis.Redis) -> None:
    registry = NodeRegistry(client)
    lease = registry.register(node("decode", "d0"), ttl_s=0.6)
    other = registry.register(node("prefill", "p0"), ttl_s=5.0)
    try:
        lease.update_load(3.0)
        time.sleep(1.5)  # 2.5 TTLs: only the heartbeat can have kept it alive
        (live,) = registry.list_nodes("decode")
        assert (live.node_id, live.ucx, live.capacity, live.load) == ("d0", "127.0.0.1:4000", 512, 3.0)
        assert 0 < client.pttl("epd:node:decode:d0") <= 600
        assert [n.node_id for n in registry.list_nodes("prefill")] == ["p0"]

        lease.stop()  # what a crashed or hung node looks like
        stopped = time.monotonic()
        assert wait_until(lambda: registry.list_nodes("decode") == [], timeout=3.0)
        assert time.monotonic() - stopped < 0.6 + 0.5
        assert registry.get("decode", "d0") is None
        assert [n.node_id for n in registry.list_nodes("prefill")] == ["p0"]
    finally:
        lease.stop()
        other.deregister()
    assert registry.list_nodes("prefill") == []


def test_room_lifecycle_with_ttl(client: redis.Redis) -> None:
    rooms = RoomStore(client, ttl_s=30)
    room = rooms.open_room("r1", sender="prefill-0", receiver="decode-0")
    assert room.state is RoomState.OPEN
    assert 0 < client.ttl("epd:room:r1") <= 30
    with pytest.raises(ValueError):
        rooms.open_room("r1", sender="prefill-1", receiver="decode-0")

    assert rooms.mark_ready("r1", "receiver", {"ucx": "127.0.0.1:4000", "pages": 12})
    assert rooms.get("r1").state is RoomState.OPEN  # type: ignore[union-attr]
    assert rooms.mark_ready("r1", "sender")
    ready = rooms.get("r1")
    assert ready is not None and ready.state is RoomState.READY
    assert ready.receiver_info == {"ucx": "127.0.0.1:4000", "pages": 12}

    assert rooms.mark_failed("r1", "decode node out of pages", stage="decode_admit", node="decode-0")
    assert rooms.mark_failed("r1", "later, unrelated", stage="prefill", node="prefill-0")
    failed = rooms.get("r1")
    assert failed is not None and failed.state is RoomState.FAILED
    assert failed.failure is not None
    assert (failed.failure.reason, failed.failure.stage, failed.failure.node) == (
        "decode node out of pages",
        "decode_admit",
        "decode-0",
    )
    assert client.ttl("epd:room:r1") > 0

    rooms.close("r1")
    assert rooms.get("r1") is None
    # A late write must not resurrect a closed room (it would live on with no TTL'd owner).
    assert not rooms.mark_ready("r1", "sender")
    assert not rooms.mark_failed("r1", "too late", stage="decode", node="decode-0")
    assert not client.exists("epd:room:r1")


def test_rooms_read_together_are_what_each_get_says(client: redis.Redis) -> None:
    """A decode node checks all its waiting requests' rooms in one round trip (`get_many`)."""
    rooms = RoomStore(client, ttl_s=30)
    rooms.open_room("m1", sender="p", receiver="d")
    rooms.open_room("m2", sender="p", receiver="d")
    rooms.mark_failed("m2", "prefill node lost", stage="prefill", node="p")
    got = rooms.get_many(["m1", "m2", "gone"])
    assert list(got) == ["m1", "m2", "gone"] and got["gone"] is None
    assert got["m1"] == rooms.get("m1") and got["m1"].state is RoomState.OPEN  # type: ignore[union-attr]
    assert got["m2"] == rooms.get("m2") and got["m2"].failure.reason == "prefill node lost"  # type: ignore[union-attr]
    assert rooms.get_many([]) == {}


def test_room_expires_by_itself(client: redis.Redis) -> None:
    rooms = RoomStore(client, ttl_s=0.3)
    rooms.open_room("r2", sender="p", receiver="d")
    assert wait_until(lambda: rooms.get("r2") is None, timeout=2.0)
    assert not rooms.mark_ready("r2", "receiver")


def test_session_records_stages_nodes_and_failure(client: redis.Redis) -> None:
    sessions = SessionStore(client, ttl_s=60)
    sessions.create("q1", nodes={"encoder": "e0"})
    assert 0 < client.ttl("epd:req:q1") <= 60
    assert sessions.assign("q1", "prefill", "p0") and sessions.assign("q1", "decode", "d0")
    for stage in (Stage.ENCODING, Stage.PREFILLING, Stage.TRANSFERRING):
        assert sessions.advance("q1", stage)
    assert sessions.fail("q1", "KV transfer: peer 127.0.0.1:4000 disconnected")
    s = sessions.get("q1")
    assert s is not None
    assert s.stage is Stage.FAILED and s.failed_stage is Stage.TRANSFERRING
    assert s.error == "KV transfer: peer 127.0.0.1:4000 disconnected"
    assert s.nodes == {"encoder": "e0", "prefill": "p0", "decode": "d0"}
    times = [s.entered[st] for st in (Stage.QUEUED, Stage.ENCODING, Stage.PREFILLING, Stage.TRANSFERRING)]
    assert times == sorted(times) and s.entered[Stage.FAILED] >= times[-1]
    assert client.ttl("epd:req:q1") > 0
    with pytest.raises(ValueError):
        sessions.create("q1")


def test_session_write_after_expiry_is_refused(client: redis.Redis) -> None:
    sessions = SessionStore(client, ttl_s=0.3)
    sessions.create("q2")
    assert wait_until(lambda: sessions.get("q2") is None, timeout=2.0)
    assert not sessions.advance("q2", Stage.DECODING)
    assert not sessions.fail("q2", "boom")
    assert not client.exists("epd:req:q2")
