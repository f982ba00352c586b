"""The cluster secret: what every node and router of one cluster holds, and what it authenticates.

Where it comes from (`ClusterSecret.load`): a file (`--cluster-secret-file`), else the
environment variable `EPD_CLUSTER_SECRET_FILE` naming one, else `EPD_CLUSTER_SECRET` holding it.
`epd serve` makes a random one for its private cluster (`ClusterSecret.generate`), in a file only
its user can read, and hands the file to every process it starts.

What it authenticates, each with its own key derived from the secret (HMAC-SHA256):
- control frames between the router and the nodes (`seal` / `unseal`): a MAC over the frame and
  the time it was sealed; a frame that fails the MAC, or is older than `MAX_AGE_S`, is refused;
- the data plane's hello (`hello_proof`): a peer proves it holds the secret before any of its
  messages is read, and a proof is good once (`ProofLedger`);
- registry entries (`sign_fields` / `fields_signed`), so a node without the secret is never routed to.

Why HMAC rather than ZMQ CURVE: one symmetric secret covers the control plane, the UCX data plane
and Redis entries alike, with no key pairs to hand out or ZAP handler to run, and it costs one
hash pass over a frame (a 720p image's 2.8 MB EncodeRequest: about 1.5 ms on each side on the
dev CPU). It authenticates; it does not encrypt: prompts and KV cross the network in clear, as in
vLLM and SGLang (run the pools on a private network, or under TLS-capable transports).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

VOLATILE = frozenset({"sig", "load", "heartbeat_at"})   # registry fields the signature leaves out
MAX_AGE_S = 120.0        # a control frame older than this (or from this far in the future) is refused
_MAC = 32
_HEADER = struct.Struct("<d")


class AuthError(ValueError):
    """A message or entry that is not the cluster's (bad MAC, stale, replayed)."""


class ClusterSecret:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the cluster secret must be at least 16 bytes")
        self._keys = {purpose: hmac.new(secret, purpose.encode(), hashlib.sha256).digest()
                      for purpose in ("control", "hello", "registry")}

    @classmethod
    def generate(cls, path: str) -> ClusterSecret:
        """A random secret, written to `path` (mode 0600)."""
        secret = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return cls(secret.encode())

    @classmethod
    def load(cls, path: str | None = None) -> ClusterSecret:
        """From `path`, else $EPD_CLUSTER_SECRET_FILE, else $EPD_CLUSTER_SECRET; ValueError when none."""
        path = path or os.environ.get("EPD_CLUSTER_SECRET_FILE")
        if path:
            with open(path) as f:
                return cls(f.read().strip().encode())
        value = os.environ.get("EPD_CLUSTER_SECRET")
        if value:
            return cls(value.encode())
        raise ValueError("no cluster secret: pass --cluster-secret-file FILE or set EPD_CLUSTER_SECRET_FILE / "
                         "EPD_CLUSTER_SECRET (epd serve makes one for its own cluster)")

    def _mac(self, purpose: str, *parts: bytes) -> bytes:
        mac = hmac.new(self._keys[purpose], digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.digest()

    # ---- control frames -------------------------------------------------------------------------
    def seal(self, payload: bytes | memoryview) -> list[bytes | memoryview]:
        """[MAC + time, payload]: two ZMQ frames, so the payload is sent without a copy."""
        stamp = _HEADER.pack(time.time())
        return [self._mac("control", stamp, payload) + stamp, payload]

    def unseal(self, header: bytes | memoryview, payload: bytes | memoryview) -> memoryview:
        """The payload of a sealed frame pair; AuthError when it is not the cluster's or too old."""
        header = bytes(header)
        if len(header) != _MAC + _HEADER.size:
            raise AuthError("control frame without the cluster's seal")
        stamp = header[_MAC:]
        if not hmac.compare_digest(header[:_MAC], self._mac("control", stamp, payload)):
            raise AuthError("control frame with a bad MAC (a sender without the cluster secret)")
        if abs(time.time() - _HEADER.unpack(stamp)[0]) > MAX_AGE_S:
            raise AuthError(f"control frame older than {MAX_AGE_S:.0f}s (a replay, or clocks apart)")
        return memoryview(payload)

    # ---- data-plane hello -----------------------------------------------------------------------
    def hello_proof(self, address: str, nonce: bytes, sent_at: float) -> bytes:
        return self._mac("hello", address.encode(), nonce, _HEADER.pack(sent_at))

    # ---- registry entries -----------------------------------------------------------------------
    def sign_fields(self, fields: Mapping[str, str]) -> str:
        """Hex MAC over a registry entry's fields in name order: all but `sig` and the ones a
        heartbeat changes (`VOLATILE`)."""
        canonical = "\x00".join(f"{k}\x01{fields[k]}" for k in sorted(fields) if k not in VOLATILE)
        return self._mac("registry", canonical.encode()).hex()

    def fields_signed(self, fields: Mapping[str, str]) -> bool:
        sig = fields.get("sig", "")
        return bool(sig) and hmac.compare_digest(sig, self.sign_fields(fields))


class ProofLedger:
    """Hello proofs seen in the last `MAX_AGE_S`: each is accepted once (no replayed hello)."""

    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, secret: ClusterSecret, address: str, nonce: bytes, sent_at: float, proof: bytes) -> None:
        if not hmac.compare_digest(proof, secret.hello_proof(address, nonce, sent_at)):
            raise AuthError(f"hello from {address!r} without the cluster secret")
        now = time.time()
        if abs(now - sent_at) > MAX_AGE_S:
            raise AuthError(f"hello from {address!r} older than {MAX_AGE_S:.0f}s")
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * MAX_AGE_S:
                self._seen.popitem(last=False)
            if proof in self._seen:
                raise AuthError(f"hello from {address!r} replayed")
            self._seen[proof] = now
