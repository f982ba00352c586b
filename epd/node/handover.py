"""The prefill -> decode KV hand-over over the wire (UCX): one sender / receiver pair per request.

Prefill side, `WireSender`: as the forward finishes each layer group (`on_layer`), that group's KV
is gathered from the request's pages into the token-major wire layout and sent (`{rid}:kv:{g}`,
a `protocol.KVGroup`); once the first token is sampled (`finish`) the `protocol.HandOver` record
follows (`{rid}:meta`), after, for a cross-attention model, the image rows' K/V of its
cross-attention layers (`{rid}:cross`, a `protocol.CrossRows`; token KV groups then cover the other
layers only). The request's pages (token and image-row pages) go back (`release`, exactly once)
when every send is acknowledged or one failed, or when it is aborted.
Decode side, `WireReceiver`: announces every key it will take, from the prefill node only and no
larger than the prompt's KV (`transport.expect`: the node reads nothing else), scatters each group
(and the image rows) into the pages it reserved as it lands (page sizes may differ), and is DONE
once the record and everything it names are in.

Both move through `HandOverState`: WAITING_FOR_PAGES (IPC only: the sender waits for decode's page
list) -> TRANSFERRING -> DONE | FAILED (with `error`). The CUDA IPC pair (`ipc_handover`) has the
same surface, and falls back on this pair (one group of every layer) when prefill cannot write
into decode's pages.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from epd import protocol
from epd.engine.kv_access import PoolLayers, as_pool_layers, landed_group
from kv_transfer.kv_codec import tokens_needed

GENERATOR_STATE_BYTES = 1 << 16    # a seeded request's sampler state (torch: 16 bytes on a GPU, 5 KB on a CPU)


class HandOverState(enum.Enum):
    WAITING_FOR_PAGES = "waiting_for_pages"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class CrossRowsKV:
    """A request's image rows on one node: the cross-attention layers' pool tensors, its pages there."""

    def __init__(self, layers: PoolLayers | list[torch.Tensor], rows: int, pages: list[int] | None = None) -> None:
        self.layers, self.rows, self.pages = as_pool_layers(layers), rows, pages or []

    def nbytes(self) -> int:
        return self.layers.nbytes(self.rows)


class WireSender:
    def __init__(self, transport: Any, peer: str, rid: str, layers: PoolLayers | list[torch.Tensor],
                 groups: list[Sequence[int]],
                 pages: list[int], prompt_len: int, release: Callable[[list[int]], None],
                 timeout_s: float | None = None, layer_ids: list[int] | None = None,
                 cross: CrossRowsKV | None = None, chunks: Sequence[int | None] = ()) -> None:
        """`layers`: the pool tensors holding token KV (`layer_ids`: which model layers they are,
        default all in order), `groups` lists of them (one kind each, `kv_codec.kind_groups`);
        `chunks`: each layer's attention chunk (a chunked layer sends only the prompt's tokens
        decode still reads: the last, partial chunk); `cross`: the image rows to send too.
        Each send fails after `timeout_s` (a decode node that stopped reading, or an address
        that does not answer, gives the pages back then instead of holding them for good)."""
        self.transport, self.peer, self.rid, self.timeout_s = transport, peer, rid, timeout_s
        self.layers, self.groups, self.prompt_len = as_pool_layers(layers), groups, prompt_len
        self.pages, self._release = pages, release
        self.cross = cross
        self.chunks = list(chunks) or [None] * len(layers)
        ids = layer_ids if layer_ids is not None else list(range(len(layers)))
        self._last_of = {ids[g[-1]]: i for i, g in enumerate(groups)}
        self.sends: list[Future] = []
        self.state, self.error = HandOverState.TRANSFERRING, ""

    @property
    def via(self) -> str:
        return "over UCX"

    def completed_group(self, layer: int) -> tuple[int, Sequence[int], int] | None:
        """(index, layers, first token sent) of the group layer `layer` completes, else None."""
        gi = self._last_of.get(layer)
        if gi is None:
            return None
        group = self.groups[gi]
        first = min(tokens_needed(self.prompt_len, self.chunks[group[0]]), self.prompt_len - 1)   # never empty
        return gi, group, first

    def on_layer(self, layer: int) -> None:
        """In the forward: layer `layer`'s K/V are in the pages; send the group it completes."""
        done = self.completed_group(layer)
        if done is None:
            return
        gi, group, first = done
        wire = self.layers.gather(group, self.pages, self.prompt_len - first, first=first)
        meta = protocol.data_meta(protocol.KVGroup(self.rid, gi, list(group), first))
        self.sends.append(self.transport.send(self.peer, f"{self.rid}:kv:{gi}", [wire], meta=meta,
                                             timeout=self.timeout_s))

    def hold_cross_pages(self, pages: list[int]) -> None:
        """The image rows' pages are this sender's now (it sends them, then gives them back)."""
        self.cross.pages = pages

    def disown(self) -> None:
        """Made for a forward that failed: the pages it names are the engine's, not its own."""
        self.pages = []
        if self.cross is not None:
            self.cross.pages = []

    def finish(self, record: protocol.HandOver, generator_state: torch.Tensor | None) -> None:
        record.num_groups = len(self.groups)
        if self.cross is not None and self.cross.rows:
            record.cross_rows = self.cross.rows
            wire = self.cross.layers.gather(range(len(self.cross.layers)), self.cross.pages, self.cross.rows)
            meta = protocol.data_meta(protocol.CrossRows(self.rid, self.cross.rows))
            self.sends.append(self.transport.send(self.peer, f"{self.rid}:cross", [wire], meta=meta,
                                                  timeout=self.timeout_s))
        tensors = [generator_state] if generator_state is not None else []
        self.sends.append(self.transport.send(self.peer, f"{self.rid}:meta", tensors,
                                              meta=protocol.data_meta(record), timeout=self.timeout_s))

    def poll(self) -> HandOverState:
        if self.state is HandOverState.TRANSFERRING and all(f.done() for f in self.sends):
            failed = [f.exception() for f in self.sends if f.exception() is not None]
            self.state = HandOverState.FAILED if failed else HandOverState.DONE
            self.error = str(failed[0]) if failed else ""
            self._give_back()
        return self.state

    @property
    def nbytes(self) -> int:
        return sum(f.result().nbytes for f in self.sends if f.done() and f.exception() is None)

    def abort(self) -> None:
        """The request is dropped: its pages go back (sends in flight finish on their own)."""
        if self.state is HandOverState.TRANSFERRING:
            self.state, self.error = HandOverState.FAILED, "aborted"
        self._give_back()

    def _give_back(self) -> None:
        held = self.held_pages()
        if held:
            self._release(held)
            self.pages = []
            if self.cross is not None:
                self.cross.pages = []

    def held_pages(self) -> list[int]:
        return self.pages + (self.cross.pages if self.cross is not None else [])


class WireReceiver:
    def __init__(self, transport: Any, peer: str, rid: str, layers: PoolLayers | list[torch.Tensor], prompt_len: int,
                 max_groups: int | None = None, cross: CrossRowsKV | None = None,
                 chunks: Sequence[int | None] = ()) -> None:
        """Announces what prefill will send for the request (when it arrives: the KV may come
        before this node has pages for it, and waits in the transport until `start`): at most
        `max_groups` KV groups (default: one a layer) over `layers` (those holding token KV; a
        chunked one, `chunks`, needs only the prompt's last chunk), and the image rows of `cross`
        (its pages come with `start`)."""
        self.transport, self.peer, self.rid = transport, peer, rid
        layers = as_pool_layers(layers)
        self.layers, self.pages, self.prompt_len = layers, None, prompt_len
        self.needed = [tokens_needed(prompt_len, chunk) for chunk in (list(chunks) or [None] * len(layers))]
        self.cross = cross if cross is not None and cross.rows else None
        self.cross_landed = self.cross is None
        self.max_groups = len(layers) if max_groups is None else max_groups
        self.record: protocol.HandOver | None = None
        self.generator_state: torch.Tensor | None = None
        self.next_group = 0
        self.first_kv_at = self.record_landed_at = 0.0
        self.state, self.error = HandOverState.TRANSFERRING, ""
        total = layers.nbytes(prompt_len)
        for key in self._group_keys(0):
            transport.expect(key, peer=peer, max_bytes=total)
        transport.expect(f"{rid}:meta", peer=peer, max_bytes=GENERATOR_STATE_BYTES)
        if self.cross is not None:
            transport.expect(f"{rid}:cross", peer=peer, max_bytes=self.cross.nbytes())

    def start(self, pool_desc: dict[str, Any] | None, pages: list[int], cross_pages: list[int] | None = None) -> None:
        """Pages are reserved: KV groups (and image rows, into `cross_pages`) land in them from now on."""
        self.pages = pages
        if self.cross is not None:
            self.cross.pages = list(cross_pages or [])

    def _group_keys(self, start: int) -> list[str]:
        return [f"{self.rid}:kv:{g}" for g in range(start, self.max_groups)]

    def poll(self, now: float) -> HandOverState:
        if self.state is not HandOverState.TRANSFERRING or self.pages is None:
            return self.state
        try:
            self._take_groups(now)
            if not self.cross_landed:
                self._take_cross()
            if self.record is None:
                self._take_record()
            done = self.record is not None and self.next_group == self.record.num_groups and \
                (self.cross_landed or self.record.ipc_written) and self.others_landed()
        except Exception as e:  # noqa: BLE001 - a broken or refused transfer fails this request only
            self._fail(str(e))
            return self.state
        if done:
            self.state = HandOverState.DONE
            self.ignore_groups()   # announced, never coming
            if not self.cross_landed:
                self.transport.ignore(f"{self.rid}:cross")
        return self.state

    def others_landed(self) -> bool:
        """Whatever other processes take of the hand-over is in (`RankWireReceiver`; here, nothing;
        image rows over CUDA IPC come with the record). Raises when theirs failed."""
        return True

    def _take_groups(self, now: float) -> None:
        while (msg := self.transport.poll(f"{self.rid}:kv:{self.next_group}")) is not None:
            group, wire = landed_group(msg, self.rid, self.next_group, self.needed, self.prompt_len,
                                       self.layers.wire_tail, "this request's")
            self.first_kv_at = self.first_kv_at or now
            self.layers.scatter(wire, group.layers, self.pages, group.first_token)
            self.next_group += 1

    def _take_cross(self) -> None:
        msg = self.transport.poll(f"{self.rid}:cross")
        if msg is None:
            return
        rows = protocol.read_data_meta(msg.meta, protocol.CrossRows, self.rid).rows
        wire = msg.tensors[0] if len(msg.tensors) == 1 else None
        cross = self.cross
        if rows != cross.rows or wire is None or \
                tuple(wire.shape) != (len(cross.layers), 2, rows, *cross.layers.wire_tail):
            raise protocol.ProtocolError(f"image rows do not fit this request's {cross.rows} rows")
        cross.layers.scatter(wire, range(len(cross.layers)), cross.pages)
        self.cross_landed = True

    def _take_record(self) -> None:
        msg = self.transport.poll(f"{self.rid}:meta")
        if msg is None:
            return
        record = protocol.read_data_meta(msg.meta, protocol.HandOver, self.rid)
        if record.error:
            raise RuntimeError(record.error)
        if record.prompt_len != self.prompt_len or not 0 <= record.num_groups <= self.max_groups:
            raise protocol.ProtocolError(f"prefill handed over {record.prompt_len} tokens of KV in "
                                         f"{record.num_groups} groups, {self.prompt_len} tokens expected")
        if record.cross_rows != (self.cross.rows if self.cross is not None else 0):
            raise protocol.ProtocolError(f"prefill handed over {record.cross_rows} image rows, "
                                         f"{self.cross.rows if self.cross is not None else 0} expected")
        self.record, self.record_landed_at = record, msg.landed_at
        self.generator_state = msg.tensors[0] if msg.tensors else None

    def _fail(self, error: str) -> None:
        self.state, self.error = HandOverState.FAILED, error
        self.abort()

    def ignore_groups(self) -> None:
        """KV groups prefill still sends for this request are freed as they land, never scattered."""
        for key in self._group_keys(self.next_group):
            self.transport.ignore(key)

    def abort(self) -> bool:
        """Whatever prefill still sends for this request is freed as it lands (no fence needed:
        nothing is written into the pages but by this node)."""
        self.ignore_groups()
        self.transport.ignore(f"{self.rid}:meta")
        if self.cross is not None and not self.cross_landed:
            self.transport.ignore(f"{self.rid}:cross")
        return False
