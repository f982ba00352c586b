"""Errors raised by the KV transport to its callers (futures, `poll`, `wait`).

Lifecycle: an error is created on the transport's network thread when a transfer fails,
stored against the message key (receive side) or set on the send future (send side), and
re-raised in the caller's thread by `poll` / `wait` / `Future.result()`.
"""

from __future__ import annotations


class TransferError(RuntimeError):
    """A message could not be delivered or received (bad shapes, cancelled, protocol)."""


class PeerLostError(TransferError):
    """The connection to the peer dropped (peer killed, network down) mid-transfer."""


class TransportClosedError(TransferError):
    """The local transport was closed while the operation was pending."""
