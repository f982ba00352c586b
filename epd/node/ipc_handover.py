"""The prefill -> decode KV hand-over through CUDA IPC (both nodes on one GPU host, one page size).

Decode side, `IpcReceiver`: sends the pages it reserved for the prompt (`{rid}:kvdst`, a
`protocol.PageList`, with its pool's IPC handles) and waits for the `protocol.HandOver` record
(`{rid}:meta`) saying the KV is in them, or for `{rid}:kvrelease` (`protocol.Release`): nothing was
or will be written. Dropped while prefill may still write, its pages are fenced: kept out of the
pool until prefill says it wrote or never will, or `fence_timeout_s` passes (`fence_over`).
Prefill side, `IpcSender`: WAITING_FOR_PAGES until decode's page list is in; queues the copy of
the request's pages into decode's right behind the last layer when the list came first
(`on_layer`), else writes once it comes (`poll`); then gives its own pages back and sends the
record (TRANSFERRING until that send is acknowledged, then DONE). A page list that does not fit
the prompt fails the request (FAILED, decode told); a request dropped before its write sends the
release.

What is mapped and written are the pools' `ipc_tensors`: per-layer tensors, or, for a
cross-attention family, the one buffer whose pages hold either a token page of every
self-attention layer or an image-row page of every cross-attention layer; so the page list is the
prompt's pages followed by the image rows' pages, each written whole.

Fallback: when prefill cannot map decode's pool (its GPU is not visible here, the IPC handle does
not open) or the write fails, it hands the KV over the wire instead, through the wire pair
(`epd.node.handover`): one KV group of the token layers (and the image rows), then the record with
`num_groups` 1 and `ipc_written` false. The receiver announced that group from the start (from
prefill only, of the prompt's KV size), so it takes either outcome; the pool is not tried again
(`PoolImports.unusable`), and the prefill node warns once per decode pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from epd import protocol
from epd.node.handover import CrossRowsKV, HandOverState, WireReceiver, WireSender

log = logging.getLogger(__name__)


WireFactory = Callable[[list[int], list[int], Callable[[list[int]], None]], WireSender]


class IpcSender:
    def __init__(self, transport: Any, peer: str, rid: str, pools: Any, tensors: list[torch.Tensor],
                 pages: list[int], prompt_pages: int, release: Callable[[list[int]], None],
                 timeout_s: float, last_layer: int, wire_sender: WireFactory, cross_pages: list[int] | None = None,
                 cross_rows: int = 0) -> None:
        """pools: this node's `PoolImports` (None off a GPU: every hand-over then goes over the wire);
        tensors: the pool's `ipc_tensors`; `last_layer`: the model layer whose end queues the write;
        `wire_sender(pages, cross_pages, release)`: the fallback's sender; `cross_pages` /
        `cross_rows`: the request's image rows (cross-attention families), written after its prompt."""
        self.transport, self.peer, self.rid, self.pools, self.layers = transport, peer, rid, pools, tensors
        self.pages, self.prompt_pages, self._release = pages, prompt_pages, release
        self.cross_pages, self.cross_rows = list(cross_pages or []), cross_rows
        self.last_layer, self._wire_sender = last_layer, wire_sender
        self.timeout_s, self.since = timeout_s, time.monotonic()
        self.dst: protocol.PageList | None = None
        self._dst_error = ""
        self.queued = self.written = False
        self.record: tuple[protocol.HandOver, torch.Tensor | None] | None = None
        self.send: Future | None = None
        self.wire: WireSender | None = None   # the fallback, once CUDA IPC failed for this request
        self.write_ms, self.state, self.error = 0.0, HandOverState.WAITING_FOR_PAGES, ""

    @property
    def via(self) -> str:
        return "over UCX (CUDA IPC failed)" if self.wire is not None else "through CUDA IPC"

    def _page_list(self) -> protocol.PageList | None:
        """Decode's page list once it is in; raises (every time) if it was refused."""
        if self.dst is None and not self._dst_error:
            try:
                msg = self.transport.poll(f"{self.rid}:kvdst")
                if msg is not None:
                    dst = protocol.read_data_meta(msg.meta, protocol.PageList, self.rid)
                    if len(dst.pages) != self.prompt_pages + len(self.cross_pages):
                        raise ValueError(f"decode reserved {len(dst.pages)} pages for a {self.prompt_pages}-page "
                                         f"prompt and {len(self.cross_pages)} pages of image rows")
                    self.dst = dst
            except Exception as e:  # noqa: BLE001 - consumed: remembered, so poll reports it
                self._dst_error = str(e) or type(e).__name__
        if self._dst_error:
            raise ValueError(self._dst_error)
        return self.dst

    def _writer(self, dst: protocol.PageList) -> Any:
        if self.pools is None:
            raise RuntimeError("this prefill node is not on a GPU")
        return self.pools.writer(dst.pool, self.layers)

    def on_layer(self, layer: int) -> None:
        """After the last layer: queue the copy behind the forward when decode's page list is in."""
        if layer != self.last_layer or self.pools is None:
            return
        try:
            dst = self._page_list()
            if dst is not None:
                self._writer(dst).copy(self._source_pages(), dst.pages)
                self.queued = True
        except Exception:  # noqa: BLE001 - poll writes again, sends over the wire, or reports it
            log.debug("could not queue the CUDA IPC write of %s", self.rid, exc_info=True)

    def hold_cross_pages(self, pages: list[int]) -> None:
        """The image rows' pages are this sender's now (it writes them, then gives them back)."""
        self.cross_pages = list(pages)

    def disown(self) -> None:
        """Made for a forward that failed: the pages it names are the engine's, not its own."""
        self.pages, self.cross_pages = [], []

    def _source_pages(self) -> list[int]:
        return self.pages[:self.prompt_pages] + self.cross_pages

    def finish(self, record: protocol.HandOver, generator_state: torch.Tensor | None) -> None:
        record.num_groups, record.cross_rows = 0, self.cross_rows
        self.record = (record, generator_state)

    def poll(self) -> HandOverState:
        if self.wire is not None:
            self.state, self.error = self.wire.poll(), self.wire.error
        elif self.state is HandOverState.WAITING_FOR_PAGES and self.record is not None:
            self._write()
        elif self.state is HandOverState.TRANSFERRING and self.send is not None and self.send.done():
            failed = self.send.exception()
            self.state = HandOverState.FAILED if failed else HandOverState.DONE
            self.error = str(failed) if failed else ""
        return self.state

    def _write(self) -> None:
        try:
            dst = self._page_list()
        except Exception as e:  # noqa: BLE001 - a lost or lying decode node fails this request only
            self._fail(str(e), tell_decode=True)
            return
        if dst is None:
            if time.monotonic() - self.since > self.timeout_s:
                self._fail(f"no page list within {self.timeout_s:.0f}s", tell_decode=True)
            return
        started = time.monotonic()
        try:
            if not self.queued:   # else it ran behind the last layer and is done by now
                self._writer(dst).write(self._source_pages(), dst.pages)
        except Exception as e:  # noqa: BLE001 - decode takes the KV over the wire instead
            self._send_over_wire(dst, str(e) or type(e).__name__)
            return
        self.written, self.write_ms = True, (time.monotonic() - started) * 1e3
        self._give_back()
        record, generator_state = self.record
        record.ipc_written = True
        record.timings.update(kv_write_ms=self.write_ms, kv_written_at=time.time())
        self.send = self.transport.send(self.peer, f"{self.rid}:meta", [generator_state] if generator_state
                                        is not None else [], meta=protocol.data_meta(record))
        self.state = HandOverState.TRANSFERRING

    def _send_over_wire(self, dst: protocol.PageList, why: str) -> None:
        """CUDA IPC failed: the prompt's KV goes over UCX as one group, then the record. The pages
        stay ours (`pages`) until the wire sender gives them back through `_give_back`."""
        if self.pools is None or self.pools.mark_unusable(dst.pool, why):
            log.warning("CUDA IPC to the decode node at %s failed (%s): its KV goes over UCX instead", self.peer, why)
        record, generator_state = self.record
        record.ipc_written = False
        self.wire = self._wire_sender(list(self.pages), list(self.cross_pages), lambda _: self._give_back())
        for layer in range(self.last_layer + 1):
            self.wire.on_layer(layer)
        self.wire.finish(record, generator_state)
        self.state = HandOverState.TRANSFERRING

    def _fail(self, error: str, tell_decode: bool) -> None:
        self.state, self.error = HandOverState.FAILED, error
        if tell_decode:   # decode frees (or stops fencing) the pages it offered
            record = protocol.HandOver(self.rid, error=error)
            self.transport.send(self.peer, f"{self.rid}:meta", [], meta=protocol.data_meta(record))
        self._give_back()

    @property
    def nbytes(self) -> int:
        return self.wire.nbytes if self.wire is not None else 0

    def abort(self) -> None:
        """Dropped: if nothing was written, decode may free the pages it offered."""
        if not self.written and self.state is not HandOverState.FAILED:
            self.transport.send(self.peer, f"{self.rid}:kvrelease", [],
                                meta=protocol.data_meta(protocol.Release(self.rid)))
        if self.wire is not None:
            self.wire.abort()
        if self.state in (HandOverState.WAITING_FOR_PAGES, HandOverState.TRANSFERRING):
            self.state, self.error = HandOverState.FAILED, "aborted"
        self.transport.ignore(f"{self.rid}:kvdst")
        self._give_back()

    def _give_back(self) -> None:
        held = self.held_pages()
        if held:
            self._release(held)
            self.pages, self.cross_pages = [], []

    def held_pages(self) -> list[int]:
        return self.pages + self.cross_pages


def announce_page_list(transport: Any, decode_peer: str, rid: str) -> None:
    """Prefill, when the request arrives: decode's page list may come (it has no tensors)."""
    transport.expect(f"{rid}:kvdst", peer=decode_peer, max_bytes=0)


class IpcReceiver:
    def __init__(self, transport: Any, peer: str, rid: str, layers: list[torch.Tensor], prompt_len: int,
                 cross: CrossRowsKV | None = None) -> None:
        """Announces what prefill will send for the request (when it arrives): the record, the
        release, and the KV as one wire group of the token `layers` with the image rows of `cross`
        (`wire`, for when prefill cannot write through CUDA IPC)."""
        self.transport, self.peer, self.rid, self.prompt_len = transport, peer, rid, prompt_len
        self.wire = WireReceiver(transport, peer, rid, layers, prompt_len, max_groups=1, cross=cross)
        self.first_kv_at = 0.0
        self.offered = False
        self.state, self.error = HandOverState.TRANSFERRING, ""
        transport.expect(f"{rid}:kvrelease", peer=peer, max_bytes=0)

    @property
    def record(self) -> protocol.HandOver | None:
        return self.wire.record

    @property
    def generator_state(self) -> torch.Tensor | None:
        return self.wire.generator_state

    @property
    def record_landed_at(self) -> float:
        return self.wire.record_landed_at

    def start(self, pool_desc: dict[str, Any], pages: list[int], cross_pages: list[int] | None = None) -> None:
        """Pages are reserved: tell prefill where to write the prompt's KV and then the image rows
        (or scatter them here, if they come over the wire)."""
        cross_pages = list(cross_pages or [])
        self.wire.start(None, pages, cross_pages)
        self.transport.send(self.peer, f"{self.rid}:kvdst", [],
                            meta=protocol.data_meta(protocol.PageList(self.rid, pool_desc, pages + cross_pages)))
        self.offered = True

    def poll(self, now: float) -> HandOverState:
        if self.state is not HandOverState.TRANSFERRING or not self.offered:
            return self.state
        try:
            state = self.wire.poll(now)
            if state is HandOverState.FAILED:
                raise RuntimeError(self.wire.error)
            if state is HandOverState.DONE:
                record = self.wire.record
                if record.ipc_written == (record.num_groups > 0):
                    raise protocol.ProtocolError(f"a hand-over record of {record.num_groups} KV groups, "
                                                 f"{'' if record.ipc_written else 'not '}written into the pages")
                self.first_kv_at = self.wire.first_kv_at or now
                self.state = HandOverState.DONE
                self.transport.ignore(f"{self.rid}:kvrelease")
            elif self.transport.poll(f"{self.rid}:kvrelease") is not None:
                raise RuntimeError("the prefill node released the pages without writing them")
        except Exception as e:  # noqa: BLE001 - a broken or refused transfer fails this request only
            self.state, self.error = HandOverState.FAILED, str(e)
            self.wire.abort()
            self.transport.ignore(f"{self.rid}:kvrelease")
        return self.state

    def fence_over(self, since: float, timeout_s: float) -> bool:
        """Dropped while prefill may still write: True once it wrote (or sent the KV over the wire),
        said it never will, or `timeout_s` passed since `since` (the pages may then go back)."""
        try:
            done = any([self.transport.poll(f"{self.rid}:meta"), self.transport.poll(f"{self.rid}:kvrelease")])
        except Exception:  # noqa: BLE001 - the connection to prefill failed: it writes no more
            done = True
        if done or time.monotonic() - since > timeout_s:
            for key in (f"{self.rid}:meta", f"{self.rid}:kvrelease"):   # the other one may still come
                self.transport.ignore(key)
            return True
        return False

    def abort(self) -> bool:
        """Dropped: True when prefill may still write into the pages (fence them: the offer is out
        and no record came yet), else False. KV groups still to come over the wire are freed as
        they land either way."""
        if self.state is HandOverState.TRANSFERRING and self.offered and self.wire.record is None:
            self.wire.ignore_groups()
            return True
        self.wire.abort()
        self.transport.ignore(f"{self.rid}:kvrelease")
        return False
