"""Tensor parallelism of a language model: the process's place in its group and the sharded layers.

One node with `--tensor-parallel-size N` is N processes, one per GPU (or N CPU processes over
gloo); each holds 1/N of the language model and of the KV heads. `set_group` is called once per
process before the model is built; the layers below read it when they are constructed, so a
family's model code builds its shard by using them and nothing else changes:

- `ColumnParallelLinear`: output features split (q/k/v by heads, gate/up by width); no communication.
- `RowParallelLinear`: input features split (o_proj, down_proj); the partial outputs are summed
  over the group (`all_reduce`), unless the caller sums several such outputs first.
- `VocabParallelEmbedding` / `VocabParallelHead`: vocabulary rows split (padded to a multiple of
  N); the embedding sums the one rank's row over the group, the head gathers every rank's logits.
Each class names the dimension of its parameters that is split (`TP_SHARDS`): the weight loader
cuts rank r's piece out of the checkpoint's full tensor (`shard_dims`, `shard_piece`).
With one process (the default) every layer is a plain torch layer and nothing is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None        # torch.distributed group of the tensors' device (NCCL on GPUs, gloo on CPU)
    cpu_group: Any = None    # gloo group for the leader's step messages


_GROUP = TPGroup()


def set_group(group: TPGroup) -> None:
    global _GROUP
    _GROUP = group


def tp_group() -> TPGroup:
    return _GROUP


def local_size(full: int, what: str) -> int:
    """`full` split over the group; ValueError naming `what` when it does not divide."""
    size = _GROUP.size
    if full % size:
        raise ValueError(f"tensor parallel size {size} does not divide {what} ({full})")
    return full // size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the group, in place (x itself with one process)."""
    if _GROUP.size > 1:
        import torch.distributed as dist

        dist.all_reduce(x, group=_GROUP.group)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated along the last dimension, in rank order."""
    if _GROUP.size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(_GROUP.size)]
    dist.all_gather(parts, x.contiguous(), group=_GROUP.group)
    return torch.cat(parts, dim=-1)


class ColumnParallelLinear(nn.Linear):
    TP_SHARDS = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, what: str = "a projection") -> None:
        super().__init__(in_features, local_size(out_features, what), bias=bias)


class RowParallelLinear(nn.Linear):
    """`reduce=False`: the output is this rank's partial sum (the caller adds up several and then
    calls `all_reduce` once). The bias is added once, after the sum."""

    TP_SHARDS = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = True,
                 what: str = "a projection") -> None:
        super().__init__(local_size(in_features, what), out_features, bias=bias)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.reduce:
            out = all_reduce(out)
        # once in the sum: after it, or (a partial sum the caller reduces) on rank 0's part only
        once = self.bias is not None and (self.reduce or _GROUP.rank == 0)
        return out + self.bias if once else out


def _vocab_rows(vocab: int) -> int:
    return -(-vocab // _GROUP.size)


class VocabParallelEmbedding(nn.Embedding):
    TP_SHARDS = {"weight": 0}

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(_vocab_rows(num_embeddings), embedding_dim)
        self.first = _GROUP.rank * self.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _GROUP.size == 1:
            return super().forward(ids)
        local = ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(rows.masked_fill(outside[:, None], 0))


class VocabParallelHead(nn.Linear):
    """hidden [T, H] -> logits [T, vocab] (every rank's vocabulary rows, gathered)."""

    TP_SHARDS = {"weight": 0}

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, _vocab_rows(vocab_size), bias=False)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.linear(hidden, self.weight)
        return all_gather_last(out)[..., :self.vocab_size] if _GROUP.size > 1 else out


def shard_dims(module: nn.Module) -> dict[str, int]:
    """Parameter name -> the dimension split over the group, for every sharded parameter."""
    if _GROUP.size == 1:
        return {}
    dims = {}
    for prefix, sub in module.named_modules():
        for param, dim in getattr(sub, "TP_SHARDS", {}).items():
            if getattr(sub, param, None) is not None:
                dims[f"{prefix}.{param}" if prefix else param] = dim
    return dims


def shard_piece(full: torch.Tensor, local_shape: torch.Size, dim: int) -> torch.Tensor:
    """This rank's piece of a checkpoint tensor along `dim` (zero rows past the end: vocabulary
    padding); ValueError when the shapes do not split that way."""
    length = local_shape[dim]
    start = _GROUP.rank * length
    others = [s for i, s in enumerate(full.shape) if i != dim] == [s for i, s in enumerate(local_shape) if i != dim]
    if full.dim() != len(local_shape) or not others or -(-full.shape[dim] // _GROUP.size) != length:
        raise ValueError(f"checkpoint shape {tuple(full.shape)} does not split into {_GROUP.size} pieces of "
                         f"{tuple(local_shape)} along dimension {dim}")
    piece = full.narrow(dim, start, max(0, min(length, full.shape[dim] - start)))
    if piece.shape[dim] < length:
        pad = list(local_shape)
        pad[dim] = length - piece.shape[dim]
        piece = torch.cat([piece, piece.new_zeros(pad)], dim=dim)
    return piece
