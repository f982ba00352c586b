"""Wire format of one transport message: a msgpack header, then one raw buffer per tensor.

Lifecycle of a message on one UCX endpoint (all tagged sends; tags are per endpoint):

1. On connect the sender sends a `Hello` (its advertised listener address) on the control
   tag, so the receiver can name the peer in errors and fail its transfers if it dies.
2. Per message, the sender sends a `Header` on the control tag: key, per-endpoint sequence
   number, one `TensorSpec` per tensor, and free-form msgpack-able `meta`.
3. Then each tensor goes as one tagged UCX message, tag ``seq * MAX_TENSORS + index``; the
   receiver posts a receive for each once it has read the header, into buffers it chose.

Control messages are framed as a 4-byte little-endian length plus msgpack, at most
`MAX_CONTROL_BYTES`, so the receiver can keep one fixed buffer posted on the control tag.
(ucxx active messages would spare the framing, but their receive futures are created on
UCX's progress thread, which aborts the process when ucxx's future pool runs dry under
bursts; tagged receives are all posted from the transport's own loop.)

Everything is msgpack with explicit types; nothing is pickled. Tensors travel as raw bytes
(viewed as uint8, so bfloat16 / fp8 need no numpy support) and are re-typed on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

PROTOCOL_VERSION = 1
MAX_TENSORS = 1 << 12  # tensors per message; keeps tags unique per (seq, index)
CONTROL_TAG = 1  # Hello and Header; tensor tags start at MAX_TENSORS (seq >= 1)
MAX_CONTROL_BYTES = 1 << 16
_LEN = 4

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype ("bfloat16"); raises for dtypes the wire does not carry."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of `dtype_name`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown wire dtype {name!r}") from None


@dataclass(frozen=True)
class TensorSpec:
    """Dtype and shape of one tensor in a message."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(dtype_name(tensor.dtype), tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * dtype_from_name(self.dtype).itemsize

    def matches(self, tensor: torch.Tensor) -> bool:
        return self == TensorSpec.of(tensor)

    def empty(self, device: torch.device | str) -> torch.Tensor:
        return torch.empty(self.shape, dtype=dtype_from_name(self.dtype), device=device)


@dataclass(frozen=True)
class Hello:
    """First active message on a new endpoint: who is sending, and (with a cluster secret) the
    proof that it holds it (kv_transfer.auth)."""

    address: str
    nonce: bytes = b""
    sent_at: float = 0.0
    proof: bytes = b""
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Header:
    """Announces one message; the tensors follow as tagged sends."""

    key: str
    seq: int
    specs: tuple[TensorSpec, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


_TAG_HELLO = "hello"
_TAG_HEADER = "header"


def encode(msg: Hello | Header) -> bytes:
    """Framed msgpack of a Hello or Header: 4-byte little-endian length, then the body."""
    if isinstance(msg, Hello):
        body: dict[str, Any] = {"t": _TAG_HELLO, "v": msg.version, "address": msg.address, "nonce": msg.nonce,
                                "sent_at": msg.sent_at, "proof": msg.proof}
    else:
        body = {
            "t": _TAG_HEADER,
            "v": msg.version,
            "key": msg.key,
            "seq": msg.seq,
            "specs": [[s.dtype, list(s.shape)] for s in msg.specs],
            "meta": msg.meta,
        }
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) + _LEN > MAX_CONTROL_BYTES:
        raise ValueError(f"message header of {len(packed)} bytes exceeds {MAX_CONTROL_BYTES}; shrink meta")
    return len(packed).to_bytes(_LEN, "little") + packed


def decode(frame: bytes | memoryview) -> Hello | Header:
    """Inverse of `encode` (trailing bytes after the framed body are ignored).

    Raises ValueError on a bad frame, an unknown kind or another protocol version.
    """
    frame = memoryview(frame)
    size = int.from_bytes(frame[:_LEN], "little")
    if size <= 0 or size + _LEN > len(frame):
        raise ValueError(f"bad control frame length {size}")
    try:
        body = msgpack.unpackb(frame[_LEN : _LEN + size], raw=False, strict_map_key=True)
        if body.get("v") != PROTOCOL_VERSION:
            raise ValueError(f"transport protocol version {body.get('v')} != {PROTOCOL_VERSION}")
        if body["t"] == _TAG_HELLO:
            hello = Hello(body["address"], bytes(body["nonce"]), float(body["sent_at"]), bytes(body["proof"]))
            if not isinstance(hello.address, str):
                raise ValueError("hello without an address")
            return hello
        if body["t"] == _TAG_HEADER:
            specs = tuple(_spec(d, shape) for d, shape in body["specs"])
            if not isinstance(body["key"], str) or not isinstance(body["seq"], int) or len(specs) > MAX_TENSORS \
                    or not isinstance(body["meta"], dict):
                raise ValueError("malformed header")
            return Header(key=body["key"], seq=body["seq"], specs=specs, meta=body["meta"])
    except (KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
        raise ValueError(f"malformed transport frame: {type(e).__name__}: {e}") from None
    raise ValueError(f"unknown transport message kind {body['t']!r}")


def _spec(dtype: Any, shape: Any) -> TensorSpec:
    dtype_from_name(dtype)   # raises for an unknown dtype
    if not isinstance(shape, list) or not all(isinstance(n, int) and 0 <= n < 1 << 40 for n in shape):
        raise ValueError(f"bad tensor shape {shape!r}")
    return TensorSpec(dtype, tuple(shape))


def tensor_tag(seq: int, index: int) -> int:
    """Tag of tensor `index` of message `seq` on one endpoint."""
    return seq * MAX_TENSORS + index


def as_buffer(tensor: torch.Tensor) -> Any:
    """Zero-copy byte view of a contiguous tensor that UCX can read from or write into.

    CPU tensors become a uint8 numpy view (buffer protocol); CUDA tensors stay torch tensors
    viewed as uint8, which expose ``__cuda_array_interface__`` (torch refuses that interface
    for bfloat16, hence the uint8 view). No host copy is made in either case.
    """
    if not tensor.is_contiguous():
        raise ValueError("tensors sent or received must be contiguous")
    flat = tensor.reshape(-1).view(torch.uint8)
    if flat.is_cuda:
        return flat
    return flat.numpy()
