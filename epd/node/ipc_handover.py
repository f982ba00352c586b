"""The prefill -> decode KV hand-over through CUDA IPC (both nodes on one GPU host, one page size).

Decode side, `IpcReceiver`: sends the pages it reserved for the prompt (`{rid}:kvdst`, a
`protocol.PageList`, with its pool's IPC handles) and waits for the `protocol.HandOver` record
(`{rid}:meta`) saying the KV is in them, or for `{rid}:kvrelease` (`protocol.Release`): nothing was
or will be written. Dropped while prefill may still write, its pages are fenced: kept out of the
pool until prefill says it wrote or never will, or `fence_timeout_s` passes (`fence_over`).
Prefill side, `IpcSender`: WAITING_FOR_PAGES until decode's page list is in; queues the copy of
the request's pages into decode's right behind the last layer when the list came first
(`on_layer`), else writes once it comes (`poll`); then gives its own pages back and sends the
record (TRANSFERRING until that send is acknowledged, then DONE). A write that fails sends the
error instead (FAILED); a request dropped before its write sends the release.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from epd import protocol
from epd.node.handover import GENERATOR_STATE_BYTES, HandOverState

log = logging.getLogger(__name__)


class IpcSender:
    def __init__(self, transport: Any, peer: str, rid: str, pools: Any, layers: list[torch.Tensor],
                 pages: list[int], prompt_pages: int, release: Callable[[list[int]], None],
                 timeout_s: float) -> None:
        self.transport, self.peer, self.rid, self.pools, self.layers = transport, peer, rid, pools, layers
        self.pages, self.prompt_pages, self._release = pages, prompt_pages, release
        self.timeout_s, self.since = timeout_s, time.monotonic()
        self.dst: protocol.PageList | None = None
        self.queued = self.written = False
        self.record: tuple[protocol.HandOver, torch.Tensor | None] | None = None
        self.send: Future | None = None
        self.write_ms, self.state, self.error = 0.0, HandOverState.WAITING_FOR_PAGES, ""

    def _page_list(self) -> protocol.PageList | None:
        if self.dst is None:
            msg = self.transport.poll(f"{self.rid}:kvdst")
            if msg is not None:
                dst = protocol.read_data_meta(msg.meta, protocol.PageList, self.rid)
                if len(dst.pages) != self.prompt_pages:
                    raise ValueError(f"decode reserved {len(dst.pages)} pages for a {self.prompt_pages}-page prompt")
                self.dst = dst
        return self.dst

    def on_layer(self, layer: int) -> None:
        """After the last layer: queue the copy behind the forward when decode's page list is in."""
        if layer != len(self.layers) - 1 or self.pools is None:
            return
        try:
            dst = self._page_list()
            if dst is not None:
                self.pools.writer(dst.pool, self.layers).copy(self.pages[:self.prompt_pages], dst.pages)
                self.queued = True
        except Exception:  # noqa: BLE001 - written, or reported, by poll
            log.exception("could not queue the CUDA IPC write of %s", self.rid)

    def finish(self, record: protocol.HandOver, generator_state: torch.Tensor | None) -> None:
        record.num_groups = 0
        self.record = (record, generator_state)

    def poll(self) -> HandOverState:
        if self.state is HandOverState.WAITING_FOR_PAGES and self.record is not None:
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
            if self.pools is None:
                raise ValueError("this prefill node is not on a GPU")
            if not self.queued:   # else it ran behind the last layer and is done by now
                self.pools.writer(dst.pool, self.layers).write(self.pages[:self.prompt_pages], dst.pages)
        except Exception as e:  # noqa: BLE001 - decode must hear of it, then the request fails
            self._fail(f"CUDA IPC write failed: {e}", tell_decode=True)
            return
        self.written, self.write_ms = True, (time.monotonic() - started) * 1e3
        self._give_back()
        record, generator_state = self.record
        record.ipc_written = True
        record.timings.update(kv_write_ms=self.write_ms, kv_written_at=time.time())
        self.send = self.transport.send(self.peer, f"{self.rid}:meta", [generator_state] if generator_state
                                        is not None else [], meta=protocol.data_meta(record))
        self.state = HandOverState.TRANSFERRING

    def _fail(self, error: str, tell_decode: bool) -> None:
        self.state, self.error = HandOverState.FAILED, error
        if tell_decode:   # decode frees (or stops fencing) the pages it offered
            record = protocol.HandOver(self.rid, error=error)
            self.transport.send(self.peer, f"{self.rid}:meta", [], meta=protocol.data_meta(record))
        self._give_back()

    @property
    def nbytes(self) -> int:
        return 0

    def abort(self) -> None:
        """Dropped: if nothing was written, decode may free the pages it offered."""
        if not self.written and self.state is not HandOverState.FAILED:
            self.transport.send(self.peer, f"{self.rid}:kvrelease", [],
                                meta=protocol.data_meta(protocol.Release(self.rid)))
        if self.state in (HandOverState.WAITING_FOR_PAGES, HandOverState.TRANSFERRING):
            self.state, self.error = HandOverState.FAILED, "aborted"
        self.transport.ignore(f"{self.rid}:kvdst")
        self._give_back()

    def _give_back(self) -> None:
        if self.pages:
            self._release(self.pages)
            self.pages = []


def announce_page_list(transport: Any, decode_peer: str, rid: str) -> None:
    """Prefill, when the request arrives: decode's page list may come (it has no tensors)."""
    transport.expect(f"{rid}:kvdst", peer=decode_peer, max_bytes=0)


class IpcReceiver:
    def __init__(self, transport: Any, peer: str, rid: str, prompt_len: int) -> None:
        """Announces what prefill will send for the request (when it arrives)."""
        self.transport, self.peer, self.rid, self.prompt_len = transport, peer, rid, prompt_len
        self.record: protocol.HandOver | None = None
        self.generator_state: torch.Tensor | None = None
        self.first_kv_at = self.record_landed_at = 0.0
        self.offered = False
        self.state, self.error = HandOverState.TRANSFERRING, ""
        transport.expect(f"{rid}:meta", peer=peer, max_bytes=GENERATOR_STATE_BYTES)
        transport.expect(f"{rid}:kvrelease", peer=peer, max_bytes=0)

    def start(self, pool_desc: dict[str, Any], pages: list[int]) -> None:
        """Pages are reserved: tell prefill where to write the prompt's KV."""
        self.transport.send(self.peer, f"{self.rid}:kvdst", [],
                            meta=protocol.data_meta(protocol.PageList(self.rid, pool_desc, pages)))
        self.offered = True

    def poll(self, now: float) -> HandOverState:
        if self.state is not HandOverState.TRANSFERRING or not self.offered:
            return self.state
        try:
            msg = self.transport.poll(f"{self.rid}:meta")
            if msg is not None:
                record = protocol.read_data_meta(msg.meta, protocol.HandOver, self.rid)
                if record.error:
                    raise RuntimeError(record.error)
                if record.prompt_len != self.prompt_len or not record.ipc_written:
                    raise protocol.ProtocolError(f"a hand-over record of {record.prompt_len} tokens, not written")
                self.record, self.record_landed_at, self.first_kv_at = record, msg.landed_at, now
                self.generator_state = msg.tensors[0] if msg.tensors else None
                self.state = HandOverState.DONE
            elif self.transport.poll(f"{self.rid}:kvrelease") is not None:
                raise RuntimeError("the prefill node released the pages without writing them")
        except Exception as e:  # noqa: BLE001 - a broken or refused transfer fails this request only
            self.state, self.error = HandOverState.FAILED, str(e)
            self.transport.ignore(f"{self.rid}:kvrelease")
        return self.state

    def fence_over(self, since: float, timeout_s: float) -> bool:
        """Dropped while prefill may still write: True once it wrote, said it never will, or
        `timeout_s` passed since `since` (the pages may then go back)."""
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
        """Dropped: True when prefill may still write into the pages (fence them), else False."""
        if self.state is HandOverState.TRANSFERRING and self.offered:
            return True
        for key in (f"{self.rid}:meta", f"{self.rid}:kvrelease"):
            self.transport.ignore(key)
        return False
