"""The asyncio half of the KV transport: UCX (ucxx) listener, endpoints, sends and receives.

Everything here runs on the transport's own event-loop thread (see `transport`); callers
never touch it directly. Lifecycle:

1. `start()` creates a private ucxx ApplicationContext (its own UCX worker, a C++ progress
   thread and a notifier thread completing Python futures, so an idle transport does not
   spin) and one listener.
2. `send()` gets the cached endpoint for the peer (connecting once, then sending a `Hello`),
   sends the msgpack `Header` on the control tag and each tensor as one tagged message.
   A dead endpoint is dropped from the cache, so the next send reconnects.
3. Each accepted endpoint runs `_serve`: read the `Hello`, then loop on headers; each header
   spawns `_receive`, which posts one tagged receive per tensor into the buffers the `Inbox`
   chose. When the endpoint dies the loop ends and the peer's pending work fails.
4. `close()` aborts all endpoints and stops UCX's threads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kv_transfer.auth import AuthError, ClusterSecret, ProofLedger
from kv_transfer.errors import PeerLostError, TransferError, TransportClosedError
from kv_transfer.inbox import Inbox, Rejected, Slot
from kv_transfer.wire import (
    CONTROL_TAG,
    MAX_CONTROL_BYTES,
    Header,
    Hello,
    TensorSpec,
    as_buffer,
    decode,
    encode,
    tensor_tag,
)

logger = logging.getLogger("kv_transfer.transport")


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad transport address {address!r}; expected host:port")
    return host.strip("[]"), int(port)


def log_transfer(verb: str, key: str, peer: str, nbytes: int, seconds: float) -> None:
    gbps = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    logger.info(
        "%s %r %s %s: %d bytes in %.2f ms, %.3f GB/s",
        verb,
        key,
        "to" if verb == "sent" else "from",
        peer,
        nbytes,
        seconds * 1e3,
        gbps,
    )


async def _wait_cuda_event(event: Any) -> None:
    """Let the producing CUDA stream finish without blocking the event loop.

    (Not an ``asyncio.sleep`` poll: the loop's timers have millisecond resolution.)
    """
    if not event.query():
        await asyncio.get_running_loop().run_in_executor(None, event.synchronize)


class _OutPeer:
    """One cached outgoing endpoint and its message sequence counter."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq


class UcxEngine:
    """Owns the UCX context; every method runs on the transport's event loop."""

    def __init__(
        self,
        inbox: Inbox,
        advertised: str,
        device: torch.device | str,
        ucx_options: dict[str, str] | None,
        connect_timeout_s: float,
        progress_mode: str = "thread",
        secret: ClusterSecret | None = None,
    ) -> None:
        self._secret = secret             # with one, peers prove they hold it before anything is read
        self._proofs = ProofLedger()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._progress_mode = progress_mode
        self._inbox = inbox
        self._advertised = advertised  # our "host:port" as peers know it (port filled by start)
        self._device = device
        self._options = dict(ucx_options or {})
        self._connect_timeout_s = connect_timeout_s
        self._ctx: Any = None
        self._listener: Any = None
        self._progress: Any = None
        self._out: dict[str, asyncio.Task[_OutPeer]] = {}
        self._lost_at: dict[str, float] = {}   # peer -> when a send to it last failed (monotonic)
        self._incoming: set[Any] = set()
        self.refused = 0   # connections closed: no proof of the secret, or messages nobody announced
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def start(self, port: int) -> int:
        """Create the UCX context and listener; returns the bound port."""
        # ucxx exports UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows and would warn
        # about in every process; must be set before libucs loads (on the ucxx import).
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        from ucxx._lib_async import ApplicationContext, application_context

        self._loop = asyncio.get_running_loop()

        self._ctx = ApplicationContext(
            self._options, progress_mode=self._progress_mode, enable_python_future=True,
            connect_timeout=self._connect_timeout_s,
        )
        # ucxx keeps progress tasks in a module dict that any context's finalizer clears;
        # hold our own reference so another transport closing cannot stop our progress thread.
        self._progress = getattr(application_context, "ProgressTasks", {}).get(asyncio.get_running_loop())
        self._listener = self._ctx.create_listener(self._serve, port=port, connect_timeout=self._connect_timeout_s)
        return int(self._listener.port)

    def set_advertised(self, address: str) -> None:
        self._advertised = address

    # ---- sending -----------------------------------------------------------------------
    async def send(
        self,
        peer: str,
        key: str,
        tensors: Sequence[torch.Tensor],
        meta: dict[str, Any],
        ready: Any,
        timeout: float | None,
        queued_at: float = -math.inf,
    ) -> tuple[int, float]:
        """Send one message; returns (bytes, seconds). Raises PeerLostError / TransferError.

        A send queued (`queued_at`, monotonic) before the connection to its peer was seen lost (a
        send to it failed, or UCX closed the endpoint) fails at once: reconnecting to a dead peer
        would only wait out the connect timeout. Sends queued later connect again (the peer may be
        back)."""
        if self._closing:
            raise TransportClosedError("transport closed")
        self._track(asyncio.current_task())
        try:
            return await asyncio.wait_for(self._send(peer, key, tensors, meta, ready, queued_at), timeout)
        except TimeoutError:
            # Posted UCX requests still reference the buffers: abort the endpoint to cancel them.
            self._drop_peer(peer, None, abort=True)
            raise TransferError(f"sending {key!r} to {peer} timed out after {timeout}s") from None

    async def _send(
        self, peer: str, key: str, tensors: Sequence[torch.Tensor], meta: dict[str, Any], ready: Any,
        queued_at: float,
    ) -> tuple[int, float]:
        cached = self._out.get(peer)   # UCX may have closed its endpoint before any send failed
        if cached is not None and cached.done() and not cached.cancelled() and cached.exception() is None \
                and cached.result().ep.closed:
            self._lost_at[peer] = time.monotonic()
        if self._lost_at.get(peer, -math.inf) >= queued_at:   # no await from here to the cache lookup
            raise PeerLostError(f"sending {key!r} to {peer} failed: the connection was lost after it was queued")
        out = await self._connect(peer)
        header = Header(key, out.next_seq(), tuple(TensorSpec.of(t) for t in tensors), meta)
        if ready is not None:
            await _wait_cuda_event(ready)
        start = time.perf_counter()
        # Header and tensors are posted together: tags keep them apart, and the receiver
        # matches the tensors once it has read the header.
        posts = [self._post(out.ep.send, np.frombuffer(encode(header), dtype=np.uint8), CONTROL_TAG)]
        posts += [
            self._post(out.ep.send, as_buffer(t), tensor_tag(header.seq, i))
            for i, t in enumerate(tensors)
            if t.numel() > 0
        ]
        try:
            await asyncio.gather(*posts)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost_at[peer] = time.monotonic()
            self._drop_peer(peer, out, abort=False)
            if self._closing:
                raise TransportClosedError("transport closed during send") from exc
            raise PeerLostError(f"sending {key!r} to {peer} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        log_transfer("sent", key, peer, header.nbytes, seconds)
        return header.nbytes, seconds

    async def _connect(self, peer: str) -> _OutPeer:
        task = self._out.get(peer)
        if task is not None and task.done() and (task.cancelled() or task.exception() or task.result().ep.closed):
            self._out.pop(peer, None)
            task = None
        if task is None:
            task = asyncio.ensure_future(self._open_endpoint(peer))
            self._out[peer] = task
        try:
            return await asyncio.shield(task)
        except (PeerLostError, TransportClosedError):
            raise
        except Exception as exc:
            raise PeerLostError(f"cannot connect to {peer}: {type(exc).__name__}: {exc}") from exc

    async def _open_endpoint(self, peer: str) -> _OutPeer:
        host, port = split_address(peer)
        ep = await self._ctx.create_endpoint(host, port, connect_timeout=self._connect_timeout_s)
        nonce, now = os.urandom(16), time.time()
        proof = self._secret.hello_proof(self._advertised, nonce, now) if self._secret is not None else b""
        hello = encode(Hello(self._advertised, nonce, now, proof))
        await self._post(ep.send, np.frombuffer(hello, dtype=np.uint8), CONTROL_TAG)
        logger.info("connected to %s", peer)
        return _OutPeer(ep)

    def _drop_peer(self, peer: str, out: _OutPeer | None, abort: bool) -> None:
        """Forget the cached endpoint to `peer` (only if it is still `out`, when given)."""
        task = self._out.get(peer)
        if task is None or not task.done() or task.cancelled() or task.exception():
            self._out.pop(peer, None)
            return
        cached = task.result()
        if out is not None and cached is not out:
            return  # already replaced by a fresh connection: keep that one
        self._out.pop(peer, None)
        if abort:
            cached.ep.abort()

    # ---- receiving ---------------------------------------------------------------------
    async def _serve(self, ep: Any) -> None:
        """Listener callback: one per accepted endpoint, for its whole life."""
        self._incoming.add(ep)
        self._track(asyncio.current_task())
        peer = "<unknown>"
        frame = np.empty(MAX_CONTROL_BYTES, dtype=np.uint8)
        try:
            await self._post(ep.recv, frame, CONTROL_TAG)
            first = decode(frame.data)
            if not isinstance(first, Hello):
                raise TransferError(f"expected Hello, got {type(first).__name__}")
            if self._secret is not None:
                self._proofs.check(self._secret, first.address, first.nonce, first.sent_at, first.proof)
            peer = first.address
            logger.info("accepted connection from %s", peer)
            self._inbox.on_peer_connected(peer)
            while True:
                await self._post(ep.recv, frame, CONTROL_TAG)
                header = decode(frame.data)
                if not isinstance(header, Header):
                    raise TransferError(f"expected Header, got {type(header).__name__}")
                slot = self._inbox.on_header(header, peer, self._device, ep)
                if slot is not None:   # else parked until announced (strict inbox)
                    self._spawn(self._receive(ep, slot, peer))
        except (AuthError, Rejected) as exc:
            self.refused += 1
            logger.warning("closed the connection from %s: %s", peer, exc)
            self._inbox.on_peer_lost(peer, PeerLostError(f"peer {peer} refused: {exc}"))
        except Exception as exc:
            if not self._closing:
                logger.warning("connection from %s ended: %s: %s", peer, type(exc).__name__, exc)
                self._inbox.on_peer_lost(peer, PeerLostError(f"peer {peer} disconnected: {exc}"))
        finally:
            self._incoming.discard(ep)
            ep.abort()

    async def _receive(self, ep: Any, slot: Slot, peer: str) -> None:
        header = slot.header
        assert header is not None
        start = time.perf_counter()
        try:
            await asyncio.gather(
                *(
                    self._post(ep.recv, as_buffer(buf), tensor_tag(header.seq, i))
                    for i, buf in enumerate(slot.buffers)
                    if buf.numel() > 0
                )
            )
        except Exception as exc:
            error = (
                TransportClosedError("transport closed")
                if self._closing
                else PeerLostError(f"receiving {header.key!r} from {peer} failed: {type(exc).__name__}: {exc}")
            )
            self._inbox.on_failed(slot, error)
            return
        seconds = time.perf_counter() - start
        log_transfer("received", header.key, peer, header.nbytes, seconds)
        self._inbox.on_complete(slot, seconds)

    async def _post(self, op: Any, buffer: Any, tag: int) -> None:
        """Post one tagged send / receive (`op` is ``ep.send`` or ``ep.recv``) and await it.

        Tops up ucxx's pool of Python futures first: the notifier thread refills it only as
        requests complete, so a burst of new requests would drain it and make ucxx refill
        it mid-burst with a warning per request.
        """
        if self._ctx is not None:
            self._ctx.worker.populate_python_futures_pool()
        await op(buffer, tag=tag)

    def receive_parked(self, slot: Slot) -> None:
        """A parked message was announced: receive it (any thread)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self._spawn(self._receive(slot.endpoint, slot, slot.peer or "")))

    def refuse(self, endpoint: Any, why: str) -> None:
        """Close a connection whose message a strict inbox refused (any thread)."""
        self.refused += 1
        logger.warning("closing a connection: %s", why)
        if self._loop is not None and endpoint is not None:
            self._loop.call_soon_threadsafe(endpoint.abort)

    def _spawn(self, coro: Any) -> None:
        self._track(asyncio.ensure_future(coro))

    def _track(self, task: asyncio.Task[Any] | None) -> None:
        """Remember a running task so that close() gives it time to fail cleanly."""
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ---- shutdown ----------------------------------------------------------------------
    async def close(self) -> None:
        """Abort every endpoint, let failing tasks settle, stop UCX threads."""
        self._closing = True
        for task in list(self._out.values()):
            if task.done() and not task.cancelled() and not task.exception():
                task.result().ep.abort()
            else:
                task.cancel()
        self._out.clear()
        for ep in list(self._incoming):
            ep.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._listener is not None:
            self._listener.close()
        if self._ctx is not None:
            self._ctx.stop_notifier_thread()
            self._ctx.worker.stop_progress_thread()
        self._listener = self._ctx = self._progress = None
