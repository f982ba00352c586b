"""Rank-by-rank KV hand-over between a prefill and a decode node of equal tensor-parallel size.

With N processes a side, rank r of the prefill node holds the same KV heads as rank r of the decode
node, so each rank can send its own heads to its peer rank: nothing is gathered on rank 0 first
and every rank's link carries 1/N of the bytes. For that every rank opens a KV transport of its own
(`open_rank_transports`, once, with the node's cluster secret; the node publishes the addresses in
the registry, and the router gives each side the other's). Then, per request:

- prefill: as a layer group completes, the leader sends its heads of it (`epd.node.rank_handover`)
  and `TPSendKV` has every other rank send its heads of the same group to its peer rank;
- decode: `TPExpectKV` has every rank announce the groups it takes (from its peer rank only, no
  more bytes than its heads of the prompt); `TPLandKV` has every rank write what has landed into
  the request's pages and answer with how many groups it wrote; `TPDropKV` ends it.

`RankKV` is a worker's side of these; the functions below are the leader's. Unequal sizes, or a
node whose peer published no rank addresses, hand over through rank 0 (`epd.engine.kv_access`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch

from epd import protocol
from epd.engine.kv_access import landed_group
from epd.tp_protocol import TPDropKV, TPExpectKV, TPLandKV, TPOpenTransport, TPSendKV, array, ints
from kv_transfer.kv_codec import gather_kv, scatter_kv

log = logging.getLogger("epd.rank_handover")
ADDRESS_BYTES = 256   # a rank's transport address ("host:port") in the address gather


def _gather_ints(group: Any, value: int) -> list[int]:
    """Every rank's `value` (rank order), over the group's CPU links."""
    import torch.distributed as dist

    parts = [torch.zeros(1, dtype=torch.long) for _ in range(group.size)]
    dist.all_gather(parts, torch.tensor([value], dtype=torch.long), group=group.cpu_group)
    return [int(p.item()) for p in parts]


def _gather_text(group: Any, text: str) -> list[str]:
    import torch.distributed as dist

    raw = text.encode()
    if len(raw) > ADDRESS_BYTES:
        raise ValueError(f"a transport address of {len(raw)} bytes")
    local = torch.zeros(ADDRESS_BYTES, dtype=torch.uint8)
    if raw:
        local[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    parts = [torch.zeros(ADDRESS_BYTES, dtype=torch.uint8) for _ in range(group.size)]
    dist.all_gather(parts, local, group=group.cpu_group)
    return [bytes(p.numpy()).rstrip(b"\0").decode() for p in parts]


# ---- the leader's side ------------------------------------------------------------------------
def open_rank_transports(leader: Any, host: str, bind: str, secret_file: str, progress: str) -> list[str]:
    """Ranks 1..N-1 open their KV transports; their addresses, in rank order."""
    leader.check_alive()
    with leader.stepping():
        leader.send(TPOpenTransport(host, bind, secret_file, progress))
        addresses = _gather_text(leader.group, "")[1:]
    if not all(addresses):
        raise RuntimeError("a tensor parallel rank could not open its KV transport (its log says why)")
    return addresses


def send_kv(leader: Any, msg: TPSendKV) -> None:
    """Inside a hooked forward (the other ranks serve the leader's messages after each layer)."""
    leader.send(msg)


def expect_kv(leader: Any, msg: TPExpectKV) -> None:
    leader.check_alive()
    with leader.stepping():
        leader.send(msg)


def land_kv(leader: Any, rid: str, pages: list[int]) -> list[int]:
    """Ranks 1..N-1's count of `rid`'s KV groups written into `pages` (-1: one failed)."""
    leader.check_alive()
    with leader.stepping():
        leader.send(TPLandKV(rid, ints(pages)))
        return _gather_ints(leader.group, 0)[1:]


def drop_kv(leader: Any, rid: str) -> None:
    leader.check_alive()
    with leader.stepping():
        leader.send(TPDropKV(rid))


# ---- a worker's side --------------------------------------------------------------------------
class _Incoming:
    def __init__(self, msg: TPExpectKV) -> None:
        self.msg, self.next_group, self.failed, self.pages = msg, 0, False, None


class RankKV:
    """A worker's KV transport and the hand-overs it takes part in."""

    def __init__(self, group: Any, kv_layers: list[torch.Tensor], device: torch.device) -> None:
        self.group, self.kv_layers, self.device = group, kv_layers, device
        self.transport: Any = None
        self.incoming: dict[str, _Incoming] = {}
        self.outgoing: dict[str, list] = {}   # rid -> [groups sent, bytes, first gather's time]
        self.lock = threading.Lock()

    def open(self, msg: TPOpenTransport) -> None:
        from kv_transfer.auth import ClusterSecret
        from kv_transfer.transport import KVTransport

        address = ""
        try:
            secret = ClusterSecret.load(msg.secret_file or None)
            self.transport = KVTransport(msg.host, 0, device=str(self.device), progress_mode=msg.progress,
                                         secret=secret, bind=msg.bind or None)
            address = self.transport.address
        except Exception as e:  # noqa: BLE001 - the leader learns of it from the empty address
            log.error("rank %d: no KV transport: %s", self.group.rank, e)
        _gather_text(self.group, address)

    def send(self, msg: TPSendKV) -> None:
        """This rank's heads of a layer group to its peer rank (the gather is done before it returns:
        the pages may be reused afterwards; the send goes on in the background)."""
        layers = [self.kv_layers[i] for i in msg.layer_ids]
        wire = gather_kv(layers, array(msg.pages).tolist(), msg.n, first=msg.first)
        meta = protocol.data_meta(protocol.KVGroup(msg.rid, msg.group, list(msg.positions), msg.first))
        peer = msg.peers[self.group.rank - 1]
        future = self.transport.send(peer, f"{msg.rid}:kv:{msg.group}", [wire], meta=meta,
                                     timeout=msg.timeout_s or None)   # 0: none
        with self.lock:
            self.outgoing.setdefault(msg.rid, [0, 0, time.monotonic()])
        future.add_done_callback(lambda f: self._sent(msg, peer, f))

    def _sent(self, msg: TPSendKV, peer: str, future: Future) -> None:
        """(The transport's thread.) Once every group of a request is sent, its time, for the log."""
        error = future.exception()
        with self.lock:
            part = self.outgoing.get(msg.rid)
            if part is None:
                return
            part[0] += 1
            part[1] += 0 if error is not None else future.result().nbytes
            if error is None and part[0] < msg.groups:
                return
            del self.outgoing[msg.rid]
        if error is not None:
            log.warning("rank %d: KV of %s not sent: %s", self.group.rank, msg.rid, error)
        else:
            log.info("rank %d: KV of %s: %d bytes (its heads) sent to %s in %.2f ms", self.group.rank, msg.rid,
                     part[1], peer, (time.monotonic() - part[2]) * 1e3)

    def expect(self, msg: TPExpectKV) -> None:
        peer = msg.peers[self.group.rank - 1]
        for g in range(msg.max_groups):
            self.transport.expect(f"{msg.rid}:kv:{g}", peer=peer, max_bytes=msg.max_bytes)
        self.incoming[msg.rid] = _Incoming(msg)

    def land(self, msg: TPLandKV) -> None:
        inc = self.incoming.get(msg.rid)
        written = -1
        if inc is not None and not inc.failed:
            inc.pages = array(msg.pages).tolist()
            try:
                self._take(inc)
                written = inc.next_group
            except Exception as e:  # noqa: BLE001 - a refused or broken group fails this request only
                inc.failed = True
                log.warning("rank %d: KV of %s refused: %s", self.group.rank, msg.rid, e)
        _gather_ints(self.group, written)

    def _take(self, inc: _Incoming) -> None:
        want = inc.msg
        while (landed := self.transport.poll(f"{want.rid}:kv:{inc.next_group}")) is not None:
            group, wire = landed_group(landed, want.rid, inc.next_group, want.needed, want.prompt_len,
                                       tuple(self.kv_layers[0].shape[3:]), "this rank's")
            layers = [self.kv_layers[want.layer_ids[j]] for j in group.layers]
            scatter_kv(wire.to(self.device), layers, inc.pages, group.first_token)
            inc.next_group += 1

    def drop(self, msg: TPDropKV) -> None:
        inc = self.incoming.pop(msg.rid, None)
        if inc is not None:
            for g in range(inc.next_group, inc.msg.max_groups):
                self.transport.ignore(f"{msg.rid}:kv:{g}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
