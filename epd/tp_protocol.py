"""The messages of a tensor-parallel group: a node's rank 0 to its other ranks (gloo, one host).

Declared as `epd.protocol`'s are, msgpack (never pickle), and checked on receipt by its
`check_message` (every field's declared type): a frame is `msgpack([tag, {field: value}])`. Arrays
of int64 travel as their bytes (`ints` / `array`). `epd.engine.tensor_parallel` sends them, in this
order per forward: `TPStep` (or `TPGraphStep` for a CUDA-graph replay), and within a hooked step,
after each layer, the layer's `TPGatherKV`s (or, rank by rank, `TPSendKV`s) then `TPLayerDone`;
between steps `TPCrossRows`, `TPGatherKV` / `TPScatterKV` for hand-overs through rank 0,
`TPExpectKV` / `TPLandKV` / `TPDropKV` for hand-overs rank by rank (`epd.engine.rank_handover`,
after one `TPOpenTransport`), and `TPStop` at the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from epd.protocol import ProtocolError, check_message


def ints(values: Any) -> bytes:
    """int64 bytes of an array or sequence of ints."""
    return np.ascontiguousarray(values, dtype=np.int64).tobytes()


def array(data: bytes) -> np.ndarray:
    """The int64 array `ints` made (read-only, a view of `data`)."""
    if len(data) % 8:
        raise ProtocolError(f"{len(data)} bytes are not int64 values")
    return np.frombuffer(data, dtype=np.int64)


@dataclass
class TPCrossChunk:
    """A chunk's cross-attention rows (`epd.engine.attention.cross.CrossChunk`); rows 0: none."""
    q: int
    rows: int = 0
    pages: bytes = b""
    visible: bytes = b""    # [q, rows] bool, bit-packed
    sees: bytes = b""       # [q] bool, bit-packed


@dataclass
class TPStep:
    """One forward: token ids, positions [position_rows, T], the attention metadata, the rows that
    sample, whether the leader's embeddings follow (image rows spliced in), whether the forward
    serves layer hooks, and a cross-attention model's chunks."""
    ids: bytes
    positions: bytes
    position_rows: int
    rows: list[int]
    qo_lens: list[int]
    kv_lens: list[int]
    table_lens: list[int]
    tables: bytes
    page_size: int
    slots: bytes
    spliced: bool = False
    hooked: bool = False
    cross: list[TPCrossChunk] | None = None


@dataclass
class TPGraphCross:
    """One decoded token's image rows in a graph step (`CrossGraphDecode.plan`'s row)."""
    pages: list[int]
    segments: list[list[int]]
    sees: bool


@dataclass
class TPGraphStep:
    """A CUDA-graph decode replay of bucket `bs`: `CudaGraphDecodeRunner.stage`'s inputs."""
    bs: int
    ids: bytes
    positions: bytes
    position_rows: int
    slots: bytes
    kv_lens: list[int]
    table_lens: list[int]
    tables: bytes
    cross: list[TPGraphCross] | None = None


@dataclass
class TPCrossRows:
    """A request's image rows [shape] follow (broadcast): each rank writes its heads' K/V into `pages`."""
    pages: bytes
    shape: list[int]


@dataclass
class TPGatherKV:
    """Each rank's heads of `layers`' KV, tokens [first, first + n) of `pages`, to the leader."""
    layers: list[int]
    pages: bytes
    n: int
    first: int


@dataclass
class TPScatterKV:
    """A wire tensor [shape] follows (broadcast): each rank writes its heads into `layers`' `pages`."""
    layers: list[int]
    pages: bytes
    first: int
    shape: list[int]


@dataclass
class TPOpenTransport:
    """Each rank opens a KV transport of its own (rank-by-rank hand-over): listening on `host`
    (advertised) / `bind`, with the cluster secret of `secret_file` ("": the node's environment);
    the ranks' addresses come back to the leader (`rank_handover.open_rank_transports`)."""
    host: str
    bind: str
    secret_file: str
    progress: str


@dataclass
class TPSendKV:
    """Each rank sends its heads of `layer_ids`' KV (tokens [first, first + n) of `pages`) to its
    peer rank, `peers[rank - 1]`, as KV group `group` of request `rid` (`positions`: the layers'
    places in the token layers, as the group's `protocol.KVGroup` names them)."""
    peers: list[str]
    rid: str
    group: int
    positions: list[int]
    layer_ids: list[int]
    pages: bytes
    n: int
    first: int
    timeout_s: float       # each send fails after it (0: no limit)
    groups: int = 0        # the hand-over's groups (the rank logs its part's time once all are sent)


@dataclass
class TPExpectKV:
    """Each rank announces the KV groups of `rid` it takes from its peer rank, `peers[rank - 1]`:
    at most `max_groups` groups, `max_bytes` in all, the prompt's `prompt_len` tokens of the token
    layers `layer_ids` (a layer at position j reads tokens from `needed[j]` on)."""
    rid: str
    peers: list[str]
    max_groups: int
    max_bytes: int
    prompt_len: int
    layer_ids: list[int]
    needed: list[int]


@dataclass
class TPLandKV:
    """Each rank writes what has landed of `rid`'s KV groups into `pages` and answers (a gather)
    with how many groups it has written, -1 when a group failed."""
    rid: str
    pages: bytes


@dataclass
class TPDropKV:
    """Each rank forgets `rid`'s hand-over: groups still coming are freed as they land."""
    rid: str


@dataclass
class TPLayerDone:
    """Within a hooked step: the leader's gathers of this layer are done."""


@dataclass
class TPStop:
    """The engine stops: the worker exits."""


MESSAGE_TYPES: dict[int, type] = {1: TPStep, 2: TPGraphStep, 3: TPCrossRows, 4: TPGatherKV, 5: TPScatterKV,
                                  6: TPLayerDone, 7: TPStop, 8: TPOpenTransport, 9: TPSendKV, 10: TPExpectKV,
                                  11: TPLandKV, 12: TPDropKV}
_TAGS = {cls: tag for tag, cls in MESSAGE_TYPES.items()}


def encode(msg: Any) -> bytes:
    return msgpack.packb([_TAGS[type(msg)], dataclasses.asdict(msg)], use_bin_type=True)


def decode(frame: bytes) -> Any:
    """The declared message of `frame`; ProtocolError naming what is wrong."""
    try:
        tag, body = msgpack.unpackb(frame, raw=False)
    except Exception as e:  # noqa: BLE001 - any malformed frame is a protocol error
        raise ProtocolError(f"malformed tensor-parallel message: {e}") from None
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, int) and not isinstance(tag, bool) else None
    if cls is None:
        raise ProtocolError(f"unknown tensor-parallel message tag {tag!r}")
    return check_message(cls, body)
