"""The wire hand-over rank by rank (`epd.engine.rank_handover`), for a prefill and a decode node of
equal tensor-parallel size N > 1 whose peers published their ranks' transport addresses.

`RankWireSender`: the leader sends its own heads of each layer group to the decode leader (the same
keys and `KVGroup` records as `WireSender`, with 1/N of the heads) and has every other rank send its
heads of that group to its peer rank. `RankWireReceiver`: the decode leader takes its heads as
`WireReceiver` does; every other rank announces and takes its own from its peer rank, and the
hand-over is DONE once each rank has written every group the record names. Image rows (a
cross-attention model) still travel through the leaders, with every head (`CrossRowsKV`).
"""

from __future__ import annotations

from typing import Any

from epd.engine.kv_access import PoolLayers
from epd.engine.rank_handover import drop_kv, expect_kv, land_kv, send_kv
from epd.node.handover import HandOverState, WireReceiver, WireSender
from epd.tp_protocol import TPExpectKV, TPSendKV, ints


def rank_peers(layers: PoolLayers, peers: list[str]) -> bool:
    """Whether a hand-over over `layers` (the node's token layers) goes rank by rank to `peers`,
    the other node's ranks 1..N-1: only when both sides have the same N > 1."""
    leader = layers.leader
    return leader is not None and len(peers) == leader.group.size - 1 and all(peers)


def _own_heads(layers: PoolLayers) -> PoolLayers:
    """The leader's own share of the heads of `layers` (no gather over the group)."""
    return PoolLayers(layers.layers, layers.layer_ids)


class RankWireSender(WireSender):
    def __init__(self, transport: Any, peer: str, rid: str, layers: PoolLayers, groups: list, pages: list[int],
                 prompt_len: int, release: Any, timeout_s: float | None = None, *, peers: list[str],
                 cross: Any = None, chunks: Any = ()) -> None:
        """As `WireSender`, with `peers`: the decode node's ranks 1..N-1."""
        super().__init__(transport, peer, rid, _own_heads(layers), groups, pages, prompt_len, release, timeout_s,
                         layer_ids=layers.layer_ids, cross=cross, chunks=chunks)
        self.leader, self.peers = layers.leader, peers

    @property
    def via(self) -> str:
        return f"over UCX, rank by rank ({self.leader.group.size} ranks)"

    def on_layer(self, layer: int) -> None:
        done = self.completed_group(layer)
        if done is None:
            return
        gi, group, first = done
        send_kv(self.leader, TPSendKV(self.peers, self.rid, gi, list(group), [self.layers.layer_ids[j] for j in group],
                                      ints(self.pages), self.prompt_len - first, first, self.timeout_s or 0.0,
                                      len(self.groups)))
        super().on_layer(layer)


class RankWireReceiver(WireReceiver):
    def __init__(self, transport: Any, peer: str, rid: str, layers: PoolLayers, prompt_len: int, *,
                 peers: list[str], max_groups: int | None = None, cross: Any = None, chunks: Any = ()) -> None:
        """As `WireReceiver`, with `peers`: the prefill node's ranks 1..N-1."""
        own = _own_heads(layers)
        super().__init__(transport, peer, rid, own, prompt_len, max_groups, cross, chunks)
        self.leader = layers.leader
        expect_kv(self.leader, TPExpectKV(rid, peers, self.max_groups, own.nbytes(prompt_len), prompt_len,
                                          list(own.layer_ids), self.needed))
        self.dropped = False

    def others_landed(self) -> bool:
        """Each other rank writes what has landed of its heads; True once all have every group."""
        written = land_kv(self.leader, self.rid, self.pages)
        failed = [rank for rank, n in enumerate(written, start=1) if n < 0]
        if failed:
            raise RuntimeError(f"tensor parallel rank {failed[0]} could not take its KV heads "
                               f"(its log says why)")
        return all(n == self.record.num_groups for n in written)

    def poll(self, now: float) -> HandOverState:
        state = super().poll(now)
        if state is HandOverState.DONE:
            self._drop()
        return state

    def abort(self) -> bool:
        super().abort()
        self._drop()
        return False

    def _drop(self) -> None:
        if not self.dropped:
            self.dropped = True
            drop_kv(self.leader, self.rid)
