"""The transport's receive bookkeeping: a message expected of a peer that is already gone fails at
once instead of waiting out its timeout, and waits again once that peer reconnects."""

from __future__ import annotations

import time

import pytest

from kv_transfer.errors import PeerLostError
from kv_transfer.inbox import Inbox, SlotState


def test_expecting_a_lost_peer_fails_at_once_until_it_reconnects() -> None:
    inbox = Inbox()
    inbox.expect("before", None, peer="10.0.0.1:5000")
    inbox.on_peer_lost("10.0.0.1:5000", PeerLostError("peer 10.0.0.1:5000 disconnected"))
    assert inbox.state("before") is SlotState.FAILED

    inbox.expect("after", None, peer="10.0.0.1:5000")
    started = time.monotonic()
    with pytest.raises(PeerLostError, match="disconnected"):
        inbox.wait("after", timeout=5)
    assert time.monotonic() - started < 1.0

    inbox.expect("other peer", None, peer="10.0.0.2:5000")
    assert inbox.state("other peer") is SlotState.EXPECTED

    inbox.on_peer_connected("10.0.0.1:5000")
    inbox.expect("reconnected", None, peer="10.0.0.1:5000")
    assert inbox.state("reconnected") is SlotState.EXPECTED
