"""Every message between EPD's processes, declared here (msgpack, never pickle).

Control plane (ZMQ, router <-> nodes; frames sealed with the cluster secret, kv_transfer.auth): a
frame is `msgpack([PROTOCOL_VERSION, tag, {field: value}])`. Data plane (UCX, node -> node): each
transfer's header carries one of the data-plane types below as its `meta` (`data_meta` /
`read_data_meta`), its tensors alongside. Both are checked on receipt (`check_message`): the tag,
every field's type (from the annotations), ids, ranges and sizes (`_limits`); a message that fails
is a `ProtocolError` naming the field, never a crash of the node that got it.

A request's messages, in order:
  router -> decode   DecodeRequest   (reserve pages, wait for KV, then stream tokens back; with
                                      kv_ipc, tell prefill over UCX which pages to write)
  router -> prefill  PrefillRequest  (wait for embeddings if any, prefill, hand the KV to decode)
  router -> encoder  EncodeRequest   (images -> embeddings, sent to the prefill node over UCX)
  router -> colocated GenerateRequest (the whole request in one process: its TokenDeltas come back)
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
import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from epd.typed_messages import ProtocolError, check_typed

PROTOCOL_VERSION = 9
MAX_ID = 128                   # characters of a request or node id
MAX_TOKENS = 1 << 20           # token ids in one message
MAX_IMAGES = 256
MAX_RANKS = 256                # tensor parallel ranks of a node
MAX_IMAGE_SIDE = 1 << 15
MAX_IMAGE_BYTES = 64 << 20       # an image's encoded bytes (the router's own cap is lower: MediaLimits.max_bytes)


def wall_time(monotonic_s: float) -> float:
    """The wall-clock instant (time.time()) of a time.monotonic() reading taken in this process."""
    return time.time() - (time.monotonic() - monotonic_s)


@dataclass
class ImagePayload:
    """An image the router fetched and checked, in one of two forms: `data`, its encoded bytes as
    the client gave them (the router read only their header; the node decodes them, EXIF orientation
    applied, and fails the request unless the result is width x height: epd.media.encoded), or `rgb`,
    its decoded RGB pixels (an image handed to the router already decoded); the other is empty.
    width x height: its size once oriented. layout: what the router gave it
    (epd.models.family.ImageLayout.to_wire): the embeddings must have it."""
    width: int
    height: int
    rgb: bytes
    content_hash: str
    layout: list[int] = field(default_factory=list)
    data: bytes = b""


@dataclass
class EncodeRequest:
    rid: str
    images: list[ImagePayload]
    prefill_node: str
    prefill_ucx: str
    emb_ipc: bool = False              # the prefill node may offer an EmbeddingSlot to write into (CUDA IPC)


@dataclass
class PrefillRequest:
    rid: str
    input_ids: list[int]               # image placeholders already expanded
    images: list[list[int]]            # each image's layout, in order (epd.models.family.ImageLayout.to_wire)
    params: dict                       # SamplingParams fields
    decode_node: str
    decode_ucx: str
    encoder_node: str = ""             # "" when the request has no images
    encoder_ucx: str = ""              # the only peer whose embeddings are taken for this request
    kv_ipc: bool = False               # write the KV into decode's pages through CUDA IPC (same host and page size)
    image_hashes: list[str] = field(default_factory=list)   # each image's content hash ("" none): prefix caching
    emb_ipc: bool = False              # offer the encoder an EmbeddingSlot in this node's arena (CUDA IPC)
    decode_ucx_ranks: list[str] = field(default_factory=list)   # decode's ranks 1..N-1 (equal TP: rank by rank)


@dataclass
class DecodeRequest:
    rid: str
    input_ids: list[int]
    params: dict
    prefill_node: str
    prefill_layout_hash: str
    prefill_ucx: str = ""              # the only peer whose KV is taken for this request (and, with kv_ipc,
                                       # where the reserved pages are sent)
    kv_ipc: bool = False               # prefill writes the KV into our pages through CUDA IPC
    images: list[list[int]] = field(default_factory=list)   # image layouts, for a cross-attention model
                                                            # (the image rows decode reserves and reads)
    prefill_ucx_ranks: list[str] = field(default_factory=list)  # prefill's ranks 1..N-1 (equal TP: rank by rank)


@dataclass
class GenerateRequest:
    """router -> colocated node: encode, prefill and decode in one process; the images' pixels
    travel with it (their layouts and content hashes too), its tokens come back as TokenDeltas."""
    rid: str
    input_ids: list[int]               # image placeholders already expanded
    images: list[ImagePayload]
    params: dict                       # SamplingParams fields


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
    bad_input: bool = False            # with error: the request's own input is at fault (a 400), not the node


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
    rejected_messages: int = 0         # control and data-plane messages refused (unauthenticated, malformed)
    preemptions: int = 0               # requests its scheduler pushed back for want of pages, since start
    page_size: int = 0                 # tokens per KV page (0: no KV pool)
    tensor_parallel_size: int = 1      # processes (GPUs) its language model runs over
    rates: dict[str, float] = field(default_factory=dict)   # what it gets through while busy, per second
                                                            # ("prompt_tokens", "image_tokens")


# ---- data plane (UCX, node -> node): a transfer's `meta` -----------------------------------------

@dataclass
class Embeddings:
    """encoder -> prefill, key `{rid}:emb`: one tensor [tokens, hidden] per image, in order; or no
    tensors and `in_arena`: written into the rows of the prefill node's EmbeddingSlot."""
    rid: str
    layouts: list[list[int]]
    in_arena: bool = False


@dataclass
class EmbeddingSlot:
    """prefill -> encoder, key `{rid}:embslot` (CUDA IPC): write the embeddings into the prefill
    node's arena (`epd.node.embedding_arena`) from row `first_row` on, images in order."""
    rid: str
    arena: dict[str, Any]
    first_row: int
    rows: int


@dataclass
class KVGroup:
    """prefill -> decode, key `{rid}:kv:{group}`: one tensor [layers, 2, tokens, kv_heads, head_dim]."""
    rid: str
    group: int
    layers: list[int]                  # which of the layers holding token KV (increasing)
    first_token: int = 0               # tokens first_token..prompt_len-1 (chunked layers: the last chunk)


@dataclass
class CrossRows:
    """prefill -> decode, key `{rid}:cross` (cross-attention models): the image rows' K/V of every
    cross-attention layer, one tensor [cross layers, 2, rows, kv_heads, head_dim]."""
    rid: str
    rows: int


@dataclass
class HandOver:
    """prefill -> decode, key `{rid}:meta`: what completes the hand-over (with the sampler's
    generator state as its tensor, when the request is seeded); `error` instead when it failed."""
    rid: str
    first_token: int = 0
    logprob: float | None = None
    top_logprobs: list[list[float]] | None = None
    prompt_len: int = 0
    cached_tokens: int = 0
    decode_state: dict[str, Any] = field(default_factory=dict)
    num_groups: int = 0                # KV groups sent over the wire (0: written through CUDA IPC)
    cross_rows: int = 0                # image rows sent as CrossRows (cross-attention models)
    layout: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    ipc_written: bool = False
    error: str = ""


@dataclass
class PageList:
    """decode -> prefill, key `{rid}:kvdst` (CUDA IPC): the decode pages to write the prompt's KV into."""
    rid: str
    pool: dict[str, Any]
    pages: list[int]


@dataclass
class Release:
    """prefill -> decode, key `{rid}:kvrelease` (CUDA IPC): nothing was or will be written."""
    rid: str


MESSAGE_TYPES: dict[int, type] = {
    1: EncodeRequest,
    2: PrefillRequest,
    3: DecodeRequest,
    4: StageReport,
    5: TokenDelta,
    6: Abort,
    7: StatusRequest,
    8: NodeStatus,
    9: GenerateRequest,
    20: Embeddings,
    21: KVGroup,
    22: HandOver,
    23: PageList,
    24: Release,
    25: EmbeddingSlot,
    26: CrossRows,
}
_TAGS = {cls: tag for tag, cls in MESSAGE_TYPES.items()}
_ID = re.compile(rf"[A-Za-z0-9._:@/+\-]{{1,{MAX_ID}}}")


def encode(msg: Any) -> bytes:
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise ProtocolError(f"{type(msg).__name__} is not a protocol message")
    return msgpack.packb([PROTOCOL_VERSION, tag, dataclasses.asdict(msg)], use_bin_type=True)


def decode(frame: bytes | memoryview) -> Any:
    try:
        version, tag, body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - any malformed frame is a protocol error
        raise ProtocolError(f"malformed control message: {e}") from None
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} != ours {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, int) and not isinstance(tag, bool) else None
    if cls is None:
        raise ProtocolError(f"unknown message tag {tag!r}")
    return check_message(cls, body)


def data_meta(msg: Any) -> dict[str, Any]:
    """A data-plane message as a transfer's `meta`."""
    tag = _TAGS[type(msg)]
    return {"tag": tag, "body": dataclasses.asdict(msg)}


def read_data_meta(meta: Any, cls: type, rid: str) -> Any:
    """The `cls` message in a transfer's `meta`, for request `rid`; ProtocolError otherwise."""
    if not isinstance(meta, dict) or MESSAGE_TYPES.get(meta.get("tag")) is not cls:
        raise ProtocolError(f"transfer meta is not a {cls.__name__}")
    msg = check_message(cls, meta.get("body"))
    if msg.rid != rid:
        raise ProtocolError(f"{cls.__name__} for request {msg.rid!r} under {rid!r}'s key")
    return msg


def check_message(cls: type, body: Any) -> Any:
    """`cls(**body)` once every field has its declared type and the message's limits hold."""
    return check_typed(cls, body, _limits)


def _tokens(ids: list[int], name: str) -> str:
    if not ids or len(ids) > MAX_TOKENS or not all(0 <= t < 1 << 31 for t in ids):
        return f"{name}: 1 to {MAX_TOKENS} token ids in [0, 2^31) expected"
    return ""


def _limits(msg: Any) -> str:
    """Why `msg` (well typed) is out of range, or ""."""
    for name in ("rid", "node", "decode_node", "prefill_node", "encoder_node"):
        value = getattr(msg, name, None)
        if value is None or (value == "" and name != "rid"):
            continue
        if not _ID.fullmatch(value):
            return f"{name} {str(value)[:40]!r} is not an id (1-{MAX_ID} of [A-Za-z0-9._:@/+-])"
    ranks = msg.decode_ucx_ranks if isinstance(msg, PrefillRequest) else \
        msg.prefill_ucx_ranks if isinstance(msg, DecodeRequest) else []
    if len(ranks) > MAX_RANKS or any(len(a) > MAX_ID * 2 for a in ranks):
        return f"{len(ranks)} rank addresses (at most {MAX_RANKS} of {MAX_ID * 2} characters)"
    if isinstance(msg, PrefillRequest | DecodeRequest | GenerateRequest):
        return _tokens(msg.input_ids, "input_ids") or ("too many images" if len(msg.images) > MAX_IMAGES else "")
    if isinstance(msg, EncodeRequest) and not 0 < len(msg.images) <= MAX_IMAGES:
        return f"1 to {MAX_IMAGES} images expected"
    if isinstance(msg, ImagePayload):
        if not (0 < msg.width <= MAX_IMAGE_SIDE and 0 < msg.height <= MAX_IMAGE_SIDE):
            return f"image of {msg.width}x{msg.height} pixels"
        if msg.data:
            return "both RGB and encoded bytes" if msg.rgb else (
                f"{len(msg.data)} encoded bytes, over {MAX_IMAGE_BYTES}" if len(msg.data) > MAX_IMAGE_BYTES else "")
        if len(msg.rgb) != msg.width * msg.height * 3:
            return f"{len(msg.rgb)} bytes of RGB for a {msg.width}x{msg.height} image"
    if isinstance(msg, EmbeddingSlot) and not (0 <= msg.first_row < 1 << 31 and 0 < msg.rows <= MAX_TOKENS):
        return f"rows {msg.first_row}+{msg.rows} out of range"
    if isinstance(msg, PageList) and (len(msg.pages) > MAX_TOKENS or any(p < 0 for p in msg.pages)):
        return "page ids out of range"
    rows = msg.rows if isinstance(msg, CrossRows) else msg.cross_rows if isinstance(msg, HandOver) else 0
    if not 0 <= rows <= MAX_TOKENS:
        return f"{rows} image rows"
    if isinstance(msg, KVGroup) and not (0 < len(msg.layers) <= 1 << 12 and 0 <= msg.layers[0] and all(
            a < b for a, b in zip(msg.layers, msg.layers[1:], strict=False)) and msg.layers[-1] < 1 << 12
            and 0 <= msg.first_token < MAX_TOKENS):
        return f"layers {msg.layers[:8]} (from token {msg.first_token}) are not increasing layer indices"
    return ""
