"""Control-plane messages between the router and the nodes (ZMQ frames, msgpack, never pickle).

Every message is a dataclass listed in `MESSAGE_TYPES` under a fixed tag. On the wire a frame is
`msgpack([PROTOCOL_VERSION, tag, {field: value}])`; decoding checks the version and the tag and
rejects unknown fields, so drift between router and nodes fails loudly.

A request's messages, in order:
  router -> decode   DecodeRequest   (reserve pages, wait for KV, then stream tokens back; with
                                      kv_ipc, tell prefill over UCX which pages to write)
  router -> prefill  PrefillRequest  (wait for embeddings if any, prefill, hand the KV to decode)
  router -> encoder  EncodeRequest   (images -> embeddings, sent to the prefill node over UCX)
  node   -> router   StageReport     (a stage finished or failed, with timings)
  decode -> router   TokenDelta      (new tokens; the last one has finished=True)
  router -> any      Abort           (free everything held for the request)
  anyone -> node     StatusRequest -> NodeStatus (page pool and integrity, for operators and tests)

Timings in StageReport / TokenDelta are ms per stage, except keys ending in `_at`: wall-clock
instants (time.time() seconds, see `wall_time`), which the router turns into `<key>_ms`, ms
after it received the request: the request's timeline across processes and hosts.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 4


class ProtocolError(ValueError):
    pass


def wall_time(monotonic_s: float) -> float:
    """The wall-clock instant (time.time()) of a time.monotonic() reading taken in this process."""
    return time.time() - (time.monotonic() - monotonic_s)


@dataclass
class ImagePayload:
    """Decoded RGB pixels (the router already fetched and validated the image) and the layout the
    router gave it (epd.models.family.ImageLayout.to_wire): the embeddings must have it."""
    width: int
    height: int
    rgb: bytes
    content_hash: str
    layout: list[int] = field(default_factory=list)


@dataclass
class EncodeRequest:
    rid: str
    images: list[dict]                 # ImagePayload fields
    prefill_node: str
    prefill_ucx: str


@dataclass
class PrefillRequest:
    rid: str
    input_ids: list[int]               # image placeholders already expanded
    images: list[list[int]]            # each image's layout, in order (epd.models.family.ImageLayout.to_wire)
    params: dict                       # SamplingParams fields
    decode_node: str
    decode_ucx: str
    encoder_node: str = ""             # "" when the request has no images
    kv_ipc: bool = False               # write the KV into decode's pages through CUDA IPC (same host and page size)
    image_hashes: list[str] = field(default_factory=list)   # each image's content hash ("" none): prefix caching


@dataclass
class DecodeRequest:
    rid: str
    input_ids: list[int]
    params: dict
    prefill_node: str
    prefill_layout_hash: str
    prefill_ucx: str = ""              # where to send the reserved pages (kv_ipc only)
    kv_ipc: bool = False               # prefill writes the KV into our pages through CUDA IPC


@dataclass
class StageReport:
    rid: str
    stage: str                         # "encode" | "prefill" | "transfer" | "decode"
    node: str
    ok: bool = True
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenDelta:
    rid: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[list[float]]] | None = None   # per token: [[token_id, logprob], ...]
    finished: bool = False
    finish_reason: dict | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0             # prompt tokens the prefill node took from its prefix cache
    error: str = ""
    stage: str = ""
    node: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Abort:
    rid: str
    reason: str = "aborted"


@dataclass
class StatusRequest:
    nonce: str = ""


@dataclass
class NodeStatus:
    """A node's view of itself: page pool counts, whether its integrity check passes, queues."""
    node: str
    role: str
    nonce: str = ""
    pages_total: int = 0
    pages_free: int = 0
    integrity_ok: bool = True
    integrity_error: str = ""
    queues: dict[str, int] = field(default_factory=dict)


MESSAGE_TYPES: dict[int, type] = {
    1: EncodeRequest,
    2: PrefillRequest,
    3: DecodeRequest,
    4: StageReport,
    5: TokenDelta,
    6: Abort,
    7: StatusRequest,
    8: NodeStatus,
}
_TAGS = {cls: tag for tag, cls in MESSAGE_TYPES.items()}


def encode(msg: Any) -> bytes:
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise ProtocolError(f"{type(msg).__name__} is not a protocol message")
    return msgpack.packb([PROTOCOL_VERSION, tag, dataclasses.asdict(msg)], use_bin_type=True)


def decode(frame: bytes) -> Any:
    try:
        version, tag, body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - any malformed frame is a protocol error
        raise ProtocolError(f"malformed control message: {e}") from None
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} != ours {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message tag {tag}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(body) - names
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**body)
