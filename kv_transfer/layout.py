"""KV layout descriptor: what a node's KV cache looks like, and whether two nodes may pair.

Lifecycle: each prefill / decode process builds one frozen `KVLayout` at start-up from its
model config and TP placement, publishes `layout_hash()` in its Redis node record, and, when
a room pairs a sender with a receiver, calls `check_compatible` on the peer's descriptor
(`from_dict` of what the peer published or sent). A mismatch raises `LayoutMismatchError`
naming every differing field, so the pairing is refused before a single byte moves.

Page size is deliberately absent: KV travels token-major (see `kv_codec`), so sender and
receiver may page their pools differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

# dtype names as torch spells them (`str(torch.bfloat16)` without the "torch." prefix).
KV_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8"})


class LayoutMismatchError(ValueError):
    """Two KV layouts cannot exchange KV; the message names each differing field."""


@dataclass(frozen=True)
class KVLayout:
    """The shape contract of one node's KV cache (one TP rank of it)."""

    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int  # KV heads held by this TP rank
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1
    cross_layers: tuple[int, ...] = ()   # layers whose KV is image rows (cross-attention), not tokens
    chunked_layers: tuple[int, ...] = ()   # layers attending within chunks (decode reads their last chunk only)
    attention_chunk_size: int = 0

    def __post_init__(self) -> None:
        for name in ("cross_layers", "chunked_layers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))   # lists from JSON / msgpack
            if not all(isinstance(i, int) and 0 <= i < self.num_layers for i in getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} are not layers of {self.num_layers}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV dtype {self.dtype!r}; expected one of {sorted(KV_DTYPES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (msgpack / JSON friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        """Inverse of `to_dict`; unknown keys are an error, so protocol drift is loud."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown KVLayout fields: {sorted(unknown)}")
        return cls(**data)

    def layout_hash(self) -> str:
        """Stable 16-hex-digit digest of all fields (same on every host and Python run)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def diff(self, other: KVLayout) -> list[tuple[str, Any, Any]]:
        """(field, ours, theirs) for every field whose value differs, in declaration order."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def check_compatible(self, other: KVLayout, ours: str = "local", theirs: str = "peer") -> None:
        """Raise `LayoutMismatchError` unless `other` has exactly this layout.

        `ours` / `theirs` label the two sides in the message, e.g. "prefill" / "decode":
        ``KV layout mismatch: num_kv_heads prefill=2 decode=4``.
        """
        diffs = self.diff(other)
        if diffs:
            parts = [f"{name} {ours}={a!r} {theirs}={b!r}" for name, a, b in diffs]
            raise LayoutMismatchError("KV layout mismatch: " + "; ".join(parts))
