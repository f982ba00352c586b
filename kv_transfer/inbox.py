"""Receive-side bookkeeping of the KV transport: one slot per message key.

Shared between the transport's network thread and the caller's thread under one lock.
A slot's lifecycle (a small state enum rather than flags)::

    EXPECTED ──header──▶ RECEIVING ──all tensors landed──▶ DONE ──poll/wait──▶ (removed)
        │                    │
        └──peer lost─────────┴──peer lost / bad shapes──▶ FAILED ──poll/wait raises──▶ (removed)

A strict inbox (a node's, which holds the cluster secret) reads only announced messages: the
control plane tells a node what to expect (`expect(key, peer=..., max_bytes=...)`), and a header
that arrives first is PARKED (nothing received or allocated) until then; a message from another
peer than announced, larger than announced, unannounced for PARK_TTL_S, or a key sent twice,
closes its connection instead (`Rejected`). Otherwise:
A slot starts EXPECTED when the caller registers destination buffers (`expect`) before the
header arrives: the tensors are then received straight into those buffers. A header with no
expectation starts a slot in RECEIVING with freshly allocated tensors; if the caller expects
the key later, the data is copied into its buffers on completion (the slow path).
`cancel` removes a slot at once and returns a future that resolves when nothing more will be
written into the slot's buffers. `ignore` cancels and also marks the key: if its message arrives
later (a peer still sending for a request this node dropped), it is received into scratch
buffers and freed at once instead of waiting, unclaimed, for `sweep`, which drops unclaimed
DONE / FAILED slots and marks older than its age limit. A slot
expected of a peer whose connection already ended fails at once (until that peer reconnects).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer.errors import TransferError
from kv_transfer.wire import Header, TensorSpec

logger = logging.getLogger(__name__)


class SlotState(enum.Enum):
    EXPECTED = "expected"
    PARKED = "parked"          # strict inbox: a header nobody announced yet; nothing received
    RECEIVING = "receiving"
    DONE = "done"
    FAILED = "failed"


PARK_TTL_S = 10.0       # a parked header not announced within this long closes its connection
MAX_PARKED = 256        # parked headers per peer; one more closes the connection


class Rejected(TransferError):
    """A message a strict inbox will not take: its connection is closed (`reason`)."""


@dataclass
class Message:
    """A complete received message."""

    key: str
    tensors: list[torch.Tensor]
    meta: dict[str, Any]
    peer: str  # the sender's advertised transport address
    nbytes: int
    seconds: float  # header arrival to last tensor landed
    landed_at: float = 0.0  # time.monotonic() when the last tensor landed (on the network thread)


@dataclass(eq=False)
class Slot:
    """State of one key; the network thread holds it as a handle while receiving."""

    key: str
    state: SlotState
    expected: list[torch.Tensor] | None = None
    peer: str | None = None
    header: Header | None = None
    buffers: list[torch.Tensor] = field(default_factory=list)
    message: Message | None = None
    error: BaseException | None = None
    updated: float = field(default_factory=time.monotonic)
    drained: Future[None] | None = None  # set by cancel() while RECEIVING
    max_bytes: int | None = None         # strict: the most the announced message may carry
    endpoint: Any = None                 # strict: the connection a parked header came on
    device: Any = None                   # strict: where a parked message's tensors will land


def _orphan(header: Header, peer: str, device: torch.device | str) -> Slot:
    """A receive handle whose data is drained into scratch buffers and then dropped."""
    slot = Slot(header.key, SlotState.RECEIVING, peer=peer, header=header)
    slot.buffers = [s.empty(device) for s in header.specs]
    slot.drained = Future()
    return slot


def _unannounced(header: Header, sender: str, announced_peer: str | None, max_bytes: int | None) -> str:
    """Why a strict inbox refuses `header` from `sender`, announced as given; "" when it takes it."""
    if announced_peer is not None and sender != announced_peer:
        return f"{header.key!r} came from {sender}, announced from {announced_peer}"
    if max_bytes is not None and header.nbytes > max_bytes:
        return f"{header.key!r} carries {header.nbytes} bytes, at most {max_bytes} announced"
    return ""


def _spec_mismatch(specs: Sequence[TensorSpec], buffers: Sequence[torch.Tensor]) -> str | None:
    if len(specs) != len(buffers):
        return f"sender has {len(specs)} tensors, receiver registered {len(buffers)}"
    for i, (spec, buf) in enumerate(zip(specs, buffers, strict=True)):
        if not spec.matches(buf):
            got = TensorSpec.of(buf)
            return f"tensor {i}: sender {spec.dtype}{list(spec.shape)} receiver {got.dtype}{list(got.shape)}"
        if not buf.is_contiguous():
            return f"tensor {i}: receive buffer is not contiguous"
    return None


class Inbox:
    """Thread-safe map key -> Slot with blocking waits."""

    def __init__(self, on_change: Callable[[], None] | None = None, strict: bool = False,
                 on_unpark: Callable[[Slot], None] | None = None,
                 on_reject: Callable[[Any, str], None] | None = None) -> None:
        """strict: only messages announced with `expect` (from their peer, within their size) are
        read; a header nobody announced yet is parked (nothing received, nothing allocated) until
        it is announced (`on_unpark(slot)` then receives it) or PARK_TTL_S passes; anything else
        closes its connection (`on_reject(endpoint, why)`)."""
        self._strict = strict
        self._on_unpark = on_unpark or (lambda slot: None)
        self._on_reject = on_reject or (lambda endpoint, why: None)
        self._on_change = on_change or (lambda: None)   # called whenever a slot finishes or fails
        self._slots: dict[str, Slot] = {}
        self._cond = threading.Condition()
        self._closed: BaseException | None = None
        self._lost: dict[str, BaseException] = {}   # peers whose connection ended, until they reconnect
        self._ignored: dict[str, float] = {}         # key -> when `ignore` marked it

    # ---- caller side -------------------------------------------------------------------
    def expect(self, key: str, buffers: Sequence[torch.Tensor] | None, peer: str | None,
               max_bytes: int | None = None) -> None:
        """Register destination buffers (and/or the expected sender, and the most it may send) for `key`."""
        bufs = list(buffers) if buffers is not None else None
        with self._cond:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = Slot(key, SlotState.EXPECTED, expected=bufs, peer=peer, max_bytes=max_bytes)
                if peer in self._lost:   # it is already gone: nothing more will come from it
                    self._fail_locked(slot, self._lost[peer])
                return
            if slot.state is SlotState.PARKED:
                self._unpark_locked(slot, bufs, peer, max_bytes)
                return
            if slot.header is not None and bufs is not None:
                problem = _spec_mismatch(slot.header.specs, bufs)
                if problem:
                    raise ValueError(f"expect({key!r}): {problem}")
            slot.expected = bufs if bufs is not None else slot.expected
            slot.peer = slot.peer or peer
            if slot.state is SlotState.DONE and bufs is not None and slot.message is not None:
                _copy_into(slot.message, bufs)

    def state(self, key: str) -> SlotState | None:
        """Where `key` stands, without consuming it; None if unknown (or already taken)."""
        with self._cond:
            slot = self._slots.get(key)
            return slot.state if slot is not None else None

    def poll(self, key: str) -> Message | None:
        """The finished message for `key` (removing it), None if not finished; raises on failure."""
        with self._cond:
            return self._take(key)

    def wait(self, key: str, timeout: float | None) -> Message:
        """Block until `key` finishes (returning it) or fails (raising); TimeoutError otherwise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                msg = self._take(key)
                if msg is not None:
                    return msg
                if self._closed is not None:
                    raise self._closed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no complete message under {key!r} within {timeout}s")
                self._cond.wait(remaining)

    def cancel(self, key: str) -> Future[None]:
        """Forget `key`; the future resolves once nothing more will land in its buffers."""
        drained: Future[None] = Future()
        with self._cond:
            slot = self._slots.pop(key, None)
            if slot is not None and slot.state is SlotState.RECEIVING:
                slot.drained = drained
                return drained
        drained.set_result(None)
        return drained

    def ignore(self, key: str) -> Future[None]:
        """`cancel(key)`, and drop its message unread if it arrives later."""
        with self._cond:
            self._ignored[key] = time.monotonic()
        return self.cancel(key)

    def _take(self, key: str) -> Message | None:
        slot = self._slots.get(key)
        if slot is None or slot.state in (SlotState.EXPECTED, SlotState.PARKED, SlotState.RECEIVING):
            return None
        del self._slots[key]
        if slot.state is SlotState.FAILED:
            assert slot.error is not None
            raise slot.error
        return slot.message

    # ---- network side ------------------------------------------------------------------
    def on_header(self, header: Header, peer: str, device: torch.device | str, endpoint: Any = None) -> Slot | None:
        """Pick the buffers for an arriving message; the returned slot is the receive handle, None
        when the header is parked (strict). Raises `Rejected` when the connection must close."""
        with self._cond:
            slot = self._slots.get(header.key)
            if slot is None and self._ignored.pop(header.key, None) is not None:
                return _orphan(header, peer, device)
            if self._strict:
                return self._strict_header(slot, header, peer, device, endpoint)
            if slot is not None and slot.state is not SlotState.EXPECTED:
                # The same key twice while the first is unclaimed: keep the first, drain the second.
                logger.error("duplicate message key %r from %s; dropping the new one", header.key, peer)
                return _orphan(header, peer, device)
            if slot is None:
                slot = Slot(header.key, SlotState.RECEIVING)
                self._slots[header.key] = slot
            slot.state, slot.header, slot.peer = SlotState.RECEIVING, header, peer
            slot.updated = time.monotonic()
            problem = _spec_mismatch(header.specs, slot.expected) if slot.expected is not None else None
            if slot.expected is not None and problem is None:
                slot.buffers = slot.expected
            else:
                slot.buffers = [s.empty(device) for s in header.specs]
                if problem:
                    slot.error = TransferError(f"message {header.key!r} from {peer} does not fit: {problem}")
            return slot

    def _strict_header(self, slot: Slot | None, header: Header, peer: str, device: torch.device | str,
                       endpoint: Any) -> Slot | None:
        if slot is None:
            if sum(1 for s in self._slots.values() if s.state is SlotState.PARKED and s.peer == peer) >= MAX_PARKED:
                raise Rejected(f"{peer} sent more than {MAX_PARKED} messages nobody announced")
            self._slots[header.key] = Slot(header.key, SlotState.PARKED, peer=peer, header=header, endpoint=endpoint,
                                           device=device)
            return None
        if slot.state is not SlotState.EXPECTED:
            raise Rejected(f"{peer} sent {header.key!r} twice")
        why = _unannounced(header, peer, slot.peer, slot.max_bytes)
        if why:
            self._fail_locked(slot, TransferError(f"message {header.key!r} refused: {why}"))
            raise Rejected(why)
        slot.state, slot.header, slot.peer, slot.updated = SlotState.RECEIVING, header, peer, time.monotonic()
        problem = _spec_mismatch(header.specs, slot.expected) if slot.expected is not None else None
        slot.buffers = slot.expected if slot.expected is not None and problem is None else \
            [s.empty(device) for s in header.specs]
        if problem:
            slot.error = TransferError(f"message {header.key!r} from {peer} does not fit: {problem}")
        return slot

    def _unpark_locked(self, slot: Slot, bufs: list[torch.Tensor] | None, peer: str | None,
                       max_bytes: int | None) -> None:
        """A parked header is announced now: receive it (or refuse it and close its connection)."""
        assert slot.header is not None
        slot.max_bytes, slot.expected = max_bytes, bufs
        why = _unannounced(slot.header, slot.peer or "", peer, max_bytes)
        if why:
            self._fail_locked(slot, TransferError(f"message {slot.key!r} refused: {why}"))
            self._on_reject(slot.endpoint, why)
            return
        problem = _spec_mismatch(slot.header.specs, bufs) if bufs is not None else None
        slot.state, slot.updated = SlotState.RECEIVING, time.monotonic()
        slot.buffers = bufs if bufs is not None and problem is None else \
            [s.empty(slot.device) for s in slot.header.specs]
        if problem:
            slot.error = TransferError(f"message {slot.key!r} from {slot.peer} does not fit: {problem}")
        self._on_unpark(slot)

    def on_complete(self, slot: Slot, seconds: float) -> None:
        """All tensors of `slot` landed."""
        with self._cond:
            if self._finish_orphan(slot):
                return
            assert slot.header is not None
            if slot.error is not None:
                self._fail_locked(slot, slot.error)
                return
            now = time.monotonic()
            msg = Message(slot.header.key, slot.buffers, slot.header.meta, slot.peer or "", slot.header.nbytes, seconds,
                          now)
            if slot.expected is not None and slot.buffers is not slot.expected:
                _copy_into(msg, slot.expected)
            slot.state, slot.message, slot.updated = SlotState.DONE, msg, now
            slot.buffers = []
            self._cond.notify_all()
            self._on_change()

    def on_failed(self, slot: Slot, error: BaseException) -> None:
        with self._cond:
            if not self._finish_orphan(slot):
                self._fail_locked(slot, error)

    def on_peer_connected(self, peer: str) -> None:
        """`peer` (re)connected: expectations of it wait again."""
        with self._cond:
            self._lost.pop(peer, None)

    def on_peer_lost(self, peer: str, error: BaseException) -> None:
        """Fail the slots still waiting for a header from `peer`, and those expected of it later.

        Slots already RECEIVING fail through their own receive, which UCX cancels when the
        endpoint dies: only then is it certain nothing more lands in their buffers.
        """
        with self._cond:
            self._lost[peer] = error
            for slot in list(self._slots.values()):
                if slot.peer == peer and slot.state is SlotState.EXPECTED:
                    self._fail_locked(slot, error)
                elif slot.peer == peer and slot.state is SlotState.PARKED:   # its data went with the connection
                    del self._slots[slot.key]

    def close(self, error: BaseException) -> None:
        """Fail all waiters now and forever (transport closed)."""
        with self._cond:
            self._closed = error
            for slot in list(self._slots.values()):
                if slot.state in (SlotState.EXPECTED, SlotState.RECEIVING):
                    self._fail_locked(slot, error)
            self._cond.notify_all()
            self._on_change()

    def sweep(self, max_age_s: float) -> int:
        """Drop DONE / FAILED slots nobody claimed for `max_age_s` (returns how many), and `ignore`
        marks as old; close the connections of headers parked longer than PARK_TTL_S."""
        now, dropped = time.monotonic(), 0
        with self._cond:
            self._ignored = {key: at for key, at in self._ignored.items() if now - at <= max_age_s}
            for key, slot in list(self._slots.items()):
                if slot.state is SlotState.PARKED and now - slot.updated > PARK_TTL_S:
                    del self._slots[key]
                    self._on_reject(slot.endpoint, f"{slot.peer} sent {key!r}, which nobody announced")
                    continue
                if slot.state in (SlotState.DONE, SlotState.FAILED) and now - slot.updated > max_age_s:
                    del self._slots[key]
                    dropped += 1
                    logger.warning("dropping unclaimed message %r (%s)", key, slot.state.value)
        return dropped

    def _finish_orphan(self, slot: Slot) -> bool:
        """A cancelled or duplicate slot: release it instead of publishing it."""
        if slot.drained is None:
            return False
        slot.state, slot.buffers = SlotState.FAILED, []
        if not slot.drained.done():
            slot.drained.set_result(None)
        return True

    def _fail_locked(self, slot: Slot, error: BaseException) -> None:
        slot.state, slot.error, slot.updated = SlotState.FAILED, error, time.monotonic()
        slot.buffers = []
        self._cond.notify_all()
        self._on_change()


def _copy_into(msg: Message, buffers: list[torch.Tensor]) -> None:
    """Slow path: data landed in fresh tensors before the caller registered its own."""
    for dst, src in zip(buffers, msg.tensors, strict=True):
        dst.copy_(src)
    msg.tensors = buffers
