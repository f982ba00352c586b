"""KVTransport: the data plane between nodes (UCX through ucxx), behind a synchronous API.

One `KVTransport` per node process. Lifecycle:

1. ``t = KVTransport(host, port)`` starts a daemon thread running an asyncio loop that owns
   the UCX context and the listener; ``t.address`` ("host:port") goes into the node's Redis
   record so peers can reach it.
2. Sender: ``fut = t.send(peer_address, key, tensors, meta)`` returns at once with a
   `concurrent.futures.Future` of a `SendReport`; the message is a msgpack header plus one
   UCX message per tensor (send one tensor per layer group, never one per page). CUDA
   tensors are sent as they are, after the current stream's work on them has finished.
3. Receiver: optionally ``t.expect(key, buffers)`` to have the tensors land straight in
   caller-owned buffers (shapes/dtypes are checked against the header); then ``t.poll(key)``
   from a scheduler loop, or ``t.wait(key, timeout)``, returns the `Message` once every
   tensor has landed. Without `expect`, tensors land in fresh tensors on `device`.
4. Failure: a peer that dies (or drops the connection) fails the pending send futures, and
   the receives in flight from it, with `PeerLostError` within about a second; `poll`/`wait`
   re-raise it. ``t.cancel(key)`` forgets a key; its future says when the key's buffers are
   safe to reuse.
5. ``t.close()`` (or leaving a ``with`` block) aborts everything pending with
   `TransportClosedError` and stops the thread.

Keys are strings naming request and purpose, e.g. ``f"{rid}:kv:{group}"``; streaming the KV
layer group by layer group is one message per group. Each transfer is logged at INFO with
bytes, duration and GB/s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from kv_transfer.auth import ClusterSecret
from kv_transfer.errors import PeerLostError, TransferError, TransportClosedError
from kv_transfer.inbox import Inbox, Message, SlotState
from kv_transfer.net_devices import narrowed_options
from kv_transfer.ucx_engine import UcxEngine
from kv_transfer.wire import MAX_TENSORS, dtype_name

__all__ = [
    "KVTransport",
    "Message",
    "SendReport",
    "SlotState",
    "PeerLostError",
    "TransferError",
    "TransportClosedError",
]

logger = logging.getLogger(__name__)
# What a process using a KVTransport should give sys.setswitchinterval: the transport's threads
# need the GIL for every UCX completion, and while the process's own loop is busy they wait up to
# this long each time (Python's default is 5 ms). A small message one way between two busy
# loops, on the H200 host (`python -m kv_transfer.latency_probe --wait spin --switch-interval S`):
# 4.9 ms at 0.5 ms, 1.3 ms at 0.05 ms; between two idle loops 0.7 ms (BENCHMARKS.md).
SWITCH_INTERVAL_S = 0.00005


@dataclass(frozen=True)
class SendReport:
    """Result of a completed send."""

    key: str
    peer: str
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def _ready_event(tensors: Sequence[torch.Tensor]) -> Any:
    """A CUDA event on the current stream of the tensors' device, or None for CPU tensors."""
    cuda = [t for t in tensors if t.is_cuda]
    if not cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(cuda[0].device))
    return event


class KVTransport:
    """Node-wide UCX transport with a synchronous, non-blocking-send API.

    host: the address peers use to reach this node (advertised, and the connect target).
    port: listener port, 0 for any free one.
    bind: the address the process was told to bind (a node's --host), or None. ucxx binds its
        listener to every interface whatever it is told; for one address, UCX's transports are
        narrowed to the interface carrying it (`net_devices.narrowed_options`).
    device: where tensors of un-`expect`ed messages are allocated ("cpu", "cuda:0").
    ucx_options: UCX config without the ``UCX_`` prefix, e.g. ``{"TLS": "tcp"}``; these
        override ``UCX_*`` environment variables. Leave empty on GPU hosts so UCX picks
        cuda_ipc / NVLink / RDMA by itself.
    unclaimed_ttl_s: finished messages nobody polls for this long are dropped.
    progress_mode: ucxx's progress thread: "thread" sleeps until UCX has work (one small message
        ~0.5 ms one way on a CPU host), "thread-polling" spins on a core of its own (~0.2 ms).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        device: torch.device | str = "cpu",
        ucx_options: dict[str, str] | None = None,
        connect_timeout_s: float = 5.0,
        unclaimed_ttl_s: float = 300.0,
        progress_mode: str = "thread",
        secret: ClusterSecret | None = None,
        bind: str | None = None,
    ) -> None:
        # A byte lands on this pipe whenever a message finishes or fails and whenever a send
        # completes, so a node's loop can sleep in poll() on it instead of spinning (a spinning
        # thread holds the GIL that this transport's network thread needs).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # With the cluster secret (nodes): peers must prove they hold it, and only messages the
        # control plane announced (`expect`) are read; without (probes, benchmarks): any peer.
        self._inbox = Inbox(on_change=self._wake, strict=secret is not None,
                            on_unpark=lambda slot: self._engine.receive_parked(slot),
                            on_reject=lambda endpoint, why: self._engine.refuse(endpoint, why))
        self._unclaimed_ttl_s = unclaimed_ttl_s
        self._pending: set[Future[SendReport]] = set()
        self._pending_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="kv-transport", daemon=True)
        self._thread.start()
        options = narrowed_options(bind, dict(ucx_options or {}))
        self._engine = UcxEngine(self._inbox, f"{host}:{port}", device, options, connect_timeout_s,
                                 progress_mode, secret)
        self._closed = False
        try:
            bound = self._call(self._engine.start(port), timeout=60.0)
        except BaseException:
            self._stop_loop()
            raise
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        self._engine.set_advertised(self.address)
        self._sweeper = asyncio.run_coroutine_threadsafe(self._sweep_forever(), self._loop)
        devices = options.get("NET_DEVICES") or os.environ.get("UCX_NET_DEVICES", "all")
        logger.info("KV transport listening on %s (port %d on every interface: ucxx binds no address; "
                    "UCX network devices: %s)", self.address, bound, devices)

    # ---- sending -----------------------------------------------------------------------
    def send(
        self,
        peer: str,
        key: str,
        tensors: Sequence[torch.Tensor],
        meta: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Future[SendReport]:
        """Queue one message to `peer` and return at once.

        The tensors must stay untouched until the future completes; the future cannot be
        cancelled. `meta` must be msgpack-able (checked here, in the caller's thread). On
        `timeout` the connection to the peer is aborted, since its requests still hold the
        buffers, and the future fails with TransferError.
        """
        if self._closed:
            raise TransportClosedError("transport closed")
        tensors = list(tensors)
        if len(tensors) > MAX_TENSORS:
            raise ValueError(f"at most {MAX_TENSORS} tensors per message")
        for t in tensors:
            dtype_name(t.dtype)
            if not t.is_contiguous():
                raise ValueError(f"tensor of shape {tuple(t.shape)} is not contiguous")
        meta = dict(meta or {})
        msgpack.packb(meta, use_bin_type=True)  # fail fast on what the wire cannot carry
        ready = _ready_event(tensors)
        coro = self._engine.send(peer, key, tensors, meta, ready, timeout, queued_at=time.monotonic())
        inner = asyncio.run_coroutine_threadsafe(coro, self._loop)
        outer: Future[SendReport] = Future()
        # Running from the start, so `outer.cancel()` is refused: UCX may be reading the
        # tensors, and only the transport may decide when they are free again.
        outer.set_running_or_notify_cancel()

        with self._pending_lock:
            self._pending.add(outer)

        def _done(f: Future[tuple[int, float]]) -> None:
            with self._pending_lock:
                if outer not in self._pending:
                    return  # already failed by close()
                self._pending.discard(outer)
            if f.cancelled():
                outer.set_exception(TransportClosedError("transport closed"))
            elif f.exception() is not None:
                outer.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                nbytes, seconds = f.result()
                outer.set_result(SendReport(key, peer, nbytes, seconds))
            self._wake()

        inner.add_done_callback(_done)
        return outer

    def connect(self, peer: str) -> Future[Any]:
        """Open (or reuse) the endpoint to `peer` in the background, so the first `send` to it
        does not pay connection setup (hundreds of ms over TCP). Failures surface on send."""
        if self._closed:
            raise TransportClosedError("transport closed")
        fut = asyncio.run_coroutine_threadsafe(self._engine._connect(peer), self._loop)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieve, so nothing is logged
        return fut

    # ---- receiving ---------------------------------------------------------------------
    def expect(self, key: str, buffers: Sequence[torch.Tensor] | None = None, *, peer: str | None = None,
               max_bytes: int | None = None) -> None:
        """Announce `key`: the sender it must come from, the most it may carry, and/or buffers for it.

        Buffers must be contiguous and match the sender's tensors in count, dtype and shape;
        a mismatch fails the key (ValueError here if the header is already in). With `peer`,
        losing the connection to that sender fails the key even before its header arrives. With
        a cluster secret only announced keys are read: another sender, or more bytes, fail the
        key and close that connection.
        """
        if buffers is not None:
            for b in buffers:
                if not b.is_contiguous():
                    raise ValueError("receive buffers must be contiguous")
        self._inbox.expect(key, buffers, peer, max_bytes)

    @property
    def sends_in_flight(self) -> int:
        """Messages queued or being sent (a draining node waits for them)."""
        with self._pending_lock:
            return len(self._pending)

    @property
    def refused(self) -> int:
        """Connections closed: peers without the cluster secret, or messages nobody announced."""
        return self._engine.refused

    def status(self, key: str) -> SlotState | None:
        """EXPECTED / RECEIVING / DONE / FAILED for `key` without consuming it; None if unknown."""
        return self._inbox.state(key)

    def poll(self, key: str) -> Message | None:
        """The complete message under `key` (consumed), or None; raises if it failed."""
        return self._inbox.poll(key)

    def wait(self, key: str, timeout: float | None = None) -> Message:
        """Block until the message under `key` is complete; TimeoutError after `timeout` s."""
        return self._inbox.wait(key, timeout)

    def cancel(self, key: str) -> Future[None]:
        """Forget `key`. The future is done once nothing more can be written to its buffers."""
        return self._inbox.cancel(key)

    def ignore(self, key: str) -> Future[None]:
        """`cancel(key)`, and free its message as soon as it lands if it comes later (a peer still
        sending for a request this node dropped) instead of keeping it until the unclaimed sweep."""
        return self._inbox.ignore(key)

    # ---- waking a caller's loop ---------------------------------------------------------
    @property
    def wakeup_fd(self) -> int:
        """Readable after a message finished or failed or a send completed; see `drain_wakeups`."""
        return self._wake_r

    def drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):   # full (a wake-up is pending anyway) or closed
            pass

    # ---- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Fail everything pending with TransportClosedError and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        self._sweeper.cancel()
        try:
            self._call(self._engine.close(), timeout=10.0)
        except Exception:
            logger.exception("error while closing the KV transport")
        self._inbox.close(TransportClosedError("transport closed"))
        self._stop_loop()
        with self._pending_lock:
            stranded, self._pending = self._pending, set()
        for fut in stranded:  # sends whose coroutine never got to finish
            fut.set_exception(TransportClosedError("transport closed"))
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            self._loop.close()

    async def _sweep_forever(self) -> None:
        period = max(1.0, min(60.0, self._unclaimed_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            self._inbox.sweep(self._unclaimed_ttl_s)
