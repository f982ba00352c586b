"""Layers of a KV pool as a hand-over reads and writes them: a request's tokens (or image rows) of
some layers gathered into one token-major wire tensor, or a wire tensor scattered back.

Under tensor parallelism this process holds only its share of the heads; the engine's leader
(`epd.engine.tensor_parallel.TPLeader`) then gathers every rank's heads into the wire tensor and
gives each rank its heads of one, so the wire tensor always has every head and a hand-over does
not depend on either side's tensor-parallel size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from epd import protocol
from kv_transfer.kv_codec import gather_kv, scatter_kv


class PoolLayers:
    def __init__(self, layers: list[torch.Tensor], layer_ids: list[int] | None = None, leader: Any = None) -> None:
        """`layers`: this process's pool tensors [pages, 2, page_size, heads, D]; `layer_ids`: which
        model layers they are (default 0..n-1); `leader`: the engine's TPLeader (None: one process)."""
        self.layers = layers
        self.layer_ids = layer_ids if layer_ids is not None else list(range(len(layers)))
        self.leader = leader

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def wire_tail(self) -> tuple[int, int]:
        """(heads, head_dim) of a wire tensor: every head of the model."""
        _, _, _, heads, dim = self.layers[0].shape
        return heads * (self.leader.group.size if self.leader is not None else 1), dim

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def nbytes(self, num_tokens: int) -> int:
        """Bytes of `num_tokens` tokens' K and V over every layer (on the wire)."""
        if not self.layers:
            return 0
        heads, dim = self.wire_tail
        return len(self.layers) * 2 * num_tokens * heads * dim * self.layers[0].element_size()

    def gather(self, index: Sequence[int], pages: list[int], num_tokens: int, first: int = 0) -> torch.Tensor:
        """[len(index), 2, num_tokens, heads, D] of layers `index` (positions in this list)."""
        if self.leader is not None:
            return self.leader.gather_kv([self.layer_ids[j] for j in index], pages, num_tokens, first)
        return gather_kv([self.layers[j] for j in index], pages, num_tokens, first=first)

    def scatter(self, wire: torch.Tensor, index: Sequence[int], pages: list[int], first: int = 0) -> None:
        if self.leader is not None:
            self.leader.scatter_kv(wire.to(self.device), [self.layer_ids[j] for j in index], pages, first)
        else:
            scatter_kv(wire.to(self.device), [self.layers[j] for j in index], pages, first)


def as_pool_layers(layers: PoolLayers | list[torch.Tensor]) -> PoolLayers:
    return layers if isinstance(layers, PoolLayers) else PoolLayers(list(layers))


def landed_group(landed: Any, rid: str, expected: int, needed: Sequence[int], prompt_len: int,
                 tail: tuple[int, int], whose: str) -> tuple[protocol.KVGroup, torch.Tensor]:
    """A KV group that landed for request `rid` (a transport message), checked: group `expected`,
    layers among the `len(needed)` token layers (layer j decode reads from token `needed[j]` on),
    one wire tensor [layers, 2, prompt_len - first, *tail]; ProtocolError naming `whose` KV otherwise."""
    group = protocol.read_data_meta(landed.meta, protocol.KVGroup, rid)
    wire, first = landed.tensors[0] if len(landed.tensors) == 1 else None, group.first_token
    if group.group != expected or group.layers[-1] >= len(needed) or wire is None or \
            any(first > needed[j] for j in group.layers) or \
            tuple(wire.shape) != (len(group.layers), 2, prompt_len - first, *tail):
        raise protocol.ProtocolError(f"KV group {expected} does not fit {whose} KV")
    return group, wire
