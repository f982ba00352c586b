"""KVTransport between two real processes over real UCX (TCP on loopback).

The peer process is this file run as a script (`python test_kv_transport.py sender|receiver
ARGS_JSON`): it prints one JSON event per line on stdout and rebuilds the expected bytes from
a seed, so nothing but UCX messages and JSON lines crosses the process boundary.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from kv_transfer.errors import PeerLostError, TransferError, TransportClosedError  # noqa: E402
from kv_transfer.transport import KVTransport, SlotState  # noqa: E402

UCX = {"TLS": "tcp"}
# One layer group on the wire: [layers, 2, tokens, kv_heads, head_dim] bf16 = 8 MiB.
GROUP_SHAPE = (2, 2, 1024, 8, 128)
GROUPS = 4
PEER_DEATH_BOUND_S = 5.0


def group_tensor(seed: int, msg: int, group: int) -> torch.Tensor:
    """Deterministic content both processes can rebuild."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + msg * 1009 + group)
    numel = 1
    for d in GROUP_SHAPE:
        numel *= d
    raw = torch.randint(0, 1 << 16, (numel,), generator=gen, dtype=torch.int32).to(torch.int16)
    return raw.view(torch.bfloat16).view(GROUP_SHAPE)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


# ---- the peer process -----------------------------------------------------------------
def run_sender(args: dict[str, Any]) -> None:
    """Send `count` verified messages, then stream more until killed."""
    with KVTransport(ucx_options=UCX) as t:
        emit(event="ready", address=t.address)
        reports = []
        for m in range(args["count"]):
            tensors = [group_tensor(args["seed"], m, g) for g in range(GROUPS)]
            reports.append(t.send(args["peer"], f"bulk:{m}", tensors, {"first_token": m, "mrope_delta": -m}))
        for fut in reports:
            fut.result(timeout=30)
        emit(event="bulk_sent", gbps=[r.result().gbps for r in reports])
        filler = [group_tensor(args["seed"], 0, 0)]
        i = 0
        while True:
            t.send(args["peer"], f"stream:{i}", filler).result(timeout=30)
            i += 1


def run_receiver(args: dict[str, Any]) -> None:
    """Verify `count` messages (the even ones into pre-registered buffers), then drain a stream."""
    device = args.get("device", "cpu")
    with KVTransport(device=device, ucx_options=args.get("ucx", UCX)) as t:
        buffers = {
            m: [torch.empty(GROUP_SHAPE, dtype=torch.bfloat16, device=device) for _ in range(GROUPS)]
            for m in range(0, args["count"], 2)
        }
        for m, bufs in buffers.items():
            t.expect(f"bulk:{m}", bufs)
        emit(event="ready", address=t.address)
        for m in range(args["count"]):
            msg = t.wait(f"bulk:{m}", timeout=30)
            ok = all(
                x.device == torch.device(device) and same_bytes(x.cpu(), group_tensor(args["seed"], m, g))
                for g, x in enumerate(msg.tensors)
            )
            in_place = m in buffers and all(x is b for x, b in zip(msg.tensors, buffers[m], strict=True))
            gbps = msg.nbytes / msg.seconds / 1e9
            emit(event="received", key=msg.key, ok=ok, in_place=in_place, meta=msg.meta, gbps=gbps)
        i = 0
        while True:
            t.wait(f"stream:{i}", timeout=30)
            emit(event="stream", i=i)
            i += 1


# ---- the test side --------------------------------------------------------------------
class Peer:
    """A peer process and a non-blocking reader of its JSON events."""

    def __init__(self, role: str, args: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, role, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._events.put(json.loads(line))

    def next(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self._events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stderr.seek(0)
                tail = self.stderr.read()[-3000:]
                raise AssertionError(f"peer sent no {event!r} in {timeout}s (rc={self.proc.poll()}):\n{tail}") from None
            if got["event"] == event:
                return got

    def kill(self) -> float:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        return time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.stderr.close()


@pytest.fixture
def transport() -> Iterator[KVTransport]:
    with KVTransport(ucx_options=UCX) as t:
        yield t


@pytest.fixture
def pair() -> Iterator[tuple[KVTransport, KVTransport]]:
    """Two transports in this process (sender, receiver): for receive-side bookkeeping cases."""
    with KVTransport(ucx_options=UCX) as a, KVTransport(ucx_options=UCX) as b:
        yield a, b


def test_receive_into_registered_buffers_then_sender_killed(transport: KVTransport) -> None:
    count, seed = 3, 11
    registered = {m: [torch.zeros(GROUP_SHAPE, dtype=torch.bfloat16) for _ in range(GROUPS)] for m in (0, 2)}
    for m, bufs in registered.items():
        transport.expect(f"bulk:{m}", bufs)
    peer = Peer("sender", {"peer": transport.address, "count": count, "seed": seed})
    try:
        sender_address = peer.next("ready")["address"]
        for m in range(count):
            msg = transport.wait(f"bulk:{m}", timeout=30)
            assert msg.meta == {"first_token": m, "mrope_delta": -m}
            assert msg.peer == sender_address
            assert msg.nbytes == GROUPS * 8 * 2**20
            for g, got in enumerate(msg.tensors):
                assert same_bytes(got, group_tensor(seed, m, g))
            if m in registered:  # landed straight in the caller's buffers, no copy
                assert [t.data_ptr() for t in msg.tensors] == [b.data_ptr() for b in registered[m]]
                assert all(same_bytes(b, group_tensor(seed, m, g)) for g, b in enumerate(registered[m]))
        print(f"\nsender-side GB/s per 32 MiB message: {[round(g, 3) for g in peer.next('bulk_sent')['gbps']]}")

        # The sender now streams until killed; the transfer in flight (or the next one
        # expected from it) must fail promptly, not hang until a timeout.
        i = 0
        while True:
            transport.expect(f"stream:{i}", peer=sender_address)
            if i == 2:
                killed_at = peer.kill()
            try:
                transport.wait(f"stream:{i}", timeout=20)
            except PeerLostError:
                break
            i += 1
        assert i >= 2
        assert time.monotonic() - killed_at < PEER_DEATH_BOUND_S
    finally:
        peer.close()


def test_send_to_receiver_then_receiver_killed_mid_stream(transport: KVTransport) -> None:
    count, seed = 4, 5
    peer = Peer("receiver", {"count": count, "seed": seed})
    try:
        address = peer.next("ready")["address"]
        payloads = [[group_tensor(seed, m, g) for g in range(GROUPS)] for m in range(count)]
        started = time.perf_counter()
        futures = [transport.send(address, f"bulk:{m}", payloads[m], {"m": m}) for m in range(count)]
        reports = [f.result(timeout=30) for f in futures]
        elapsed = time.perf_counter() - started
        for m in range(count):
            got = peer.next("received")
            assert got == {**got, "key": f"bulk:{m}", "ok": True, "meta": {"m": m}, "in_place": m % 2 == 0}
        total = sum(r.nbytes for r in reports)
        print(
            f"\nsend {total / 2**20:.0f} MiB in {elapsed * 1e3:.0f} ms: {total / elapsed / 1e9:.3f} GB/s; "
            f"per message {[round(r.gbps, 3) for r in reports]}"
        )

        filler = group_tensor(seed, 0, 0)
        stream: list[Future[Any]] = [transport.send(address, f"stream:{i}", [filler]) for i in range(200)]
        peer.next("stream")
        killed_at = peer.kill()
        _, pending = wait(stream, timeout=PEER_DEATH_BOUND_S + 5)
        assert not pending, f"{len(pending)} sends still pending after the receiver died"
        assert time.monotonic() - killed_at < PEER_DEATH_BOUND_S
        errors = [f.exception() for f in stream if f.exception() is not None]
        assert errors, "the receiver was killed after the whole stream had landed; nothing was tested"
        assert all(isinstance(e, PeerLostError) for e in errors)
        assert address in str(errors[0])
    finally:
        peer.close()


def test_late_expect_gets_a_copy_and_bad_shapes_fail_the_key(pair: tuple[KVTransport, KVTransport]) -> None:
    """A message that beat its `expect` is copied into the buffers; a registered buffer of the
    wrong shape fails that key with a message naming both shapes."""
    a, b = pair
    x = group_tensor(1, 0, 0)
    a.send(b.address, "early", [x]).result(timeout=30)
    deadline = time.monotonic() + 10
    while b.status("early") is not SlotState.DONE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    late = torch.zeros_like(x)
    b.expect("early", [late])
    msg = b.wait("early", timeout=10)
    assert msg.tensors[0] is late and same_bytes(late, x)

    b.expect("bad", [torch.empty(3, 3, dtype=torch.bfloat16)])
    a.send(b.address, "bad", [x]).result(timeout=30)
    with pytest.raises(TransferError, match=r"bfloat16\[2, 2, 1024, 8, 128\] receiver bfloat16\[3, 3\]"):
        b.wait("bad", timeout=10)


def test_cancelled_key_leaves_its_buffers_alone(pair: tuple[KVTransport, KVTransport]) -> None:
    a, b = pair
    x = group_tensor(2, 0, 0)
    mine = torch.zeros_like(x)
    b.expect("req9:kv:0", [mine])
    assert b.cancel("req9:kv:0").result(timeout=1) is None
    a.send(b.address, "req9:kv:0", [x]).result(timeout=30)
    msg = b.wait("req9:kv:0", timeout=10)  # arrives as an un-expected message, in fresh memory
    assert msg.tensors[0] is not mine and same_bytes(msg.tensors[0], x)
    assert mine.view(torch.int16).count_nonzero() == 0


def test_ignored_key_is_dropped_as_it_lands(pair: tuple[KVTransport, KVTransport]) -> None:
    """A request dropped on the receiver while its sender still sends: the late message is freed
    on arrival, not kept (with its tensors) until the unclaimed sweep."""
    a, b = pair
    b.ignore("req8:kv:0")
    a.send(b.address, "req8:kv:0", [group_tensor(3, 0, 0)]).result(timeout=30)
    a.send(b.address, "req8:after", [group_tensor(3, 1, 0)]).result(timeout=30)
    b.wait("req8:after", timeout=10)                   # sent later on the same endpoint
    assert b.status("req8:kv:0") is None and b.poll("req8:kv:0") is None


def test_close_fails_pending_waits_and_refuses_new_sends() -> None:
    t = KVTransport(ucx_options=UCX)
    t.expect("never")
    errors: list[BaseException] = []

    def waiter_body() -> None:
        try:
            t.wait("never", timeout=30)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    waiter = threading.Thread(target=waiter_body)
    waiter.start()
    time.sleep(0.1)
    t.close()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and len(errors) == 1 and isinstance(errors[0], TransportClosedError)
    with pytest.raises(TransportClosedError):
        t.send("127.0.0.1:1", "k", [torch.zeros(4)])


@pytest.mark.gpu
def test_cuda_tensors_go_device_to_device_between_processes() -> None:
    """On the GPU host: CUDA tensors in, CUDA tensors out, UCX choosing the path (cuda_ipc)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    count, seed = 4, 21
    with KVTransport(device="cuda:0") as t:
        peer = Peer("receiver", {"count": count, "seed": seed, "device": "cuda:0", "ucx": None})
        try:
            address = peer.next("ready")["address"]
            for m in range(count):
                tensors = [group_tensor(seed, m, g).cuda() for g in range(GROUPS)]
                report = t.send(address, f"bulk:{m}", tensors, {"m": m}).result(timeout=60)
                got = peer.next("received")
                assert got == {**got, "key": f"bulk:{m}", "ok": True, "meta": {"m": m}, "in_place": m % 2 == 0}
                print(f"\nCUDA message {m}: send {report.gbps:.1f} GB/s, receive {got['gbps']:.1f} GB/s")
        finally:
            peer.close()


@pytest.mark.parametrize("wait", ["poller", "spin"])
def test_latency_probe_reports_one_way_times_of_messages_that_made_the_round_trip(wait: str) -> None:
    """`python -m kv_transfer.latency_probe`: each ping (here with a 1 MiB tensor) is answered before
    the next goes, so a reply that never came would time the probe out; it reports the spread."""
    out = subprocess.run([sys.executable, "-m", "kv_transfer.latency_probe", "--pings", "12", "--warmup", "2",
                          "--mib", "1", "--wait", wait], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert report["pings"] == 12 and report["wait"] == wait and report["ping_mib"] == 1.0
    assert 0 < report["one_way_ms_p10"] <= report["one_way_ms_median"] <= report["one_way_ms_p90"] < 1000


if __name__ == "__main__":
    role, raw = sys.argv[1], json.loads(sys.argv[2])
    {"sender": run_sender, "receiver": run_receiver}[role](raw)
