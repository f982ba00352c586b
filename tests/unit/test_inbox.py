"""The transport's receive bookkeeping: a message expected of a peer that is already gone fails at
once instead of waiting out its timeout, and waits again once that peer reconnects; a message for
a key this node ignored (its request was dropped) is freed as it lands, not kept for the sweep."""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer.errors import PeerLostError
from kv_transfer.inbox import Inbox, SlotState
from kv_transfer.wire import Header, TensorSpec


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


def test_an_ignored_key_is_received_into_scratch_and_dropped() -> None:
    changes: list[int] = []
    inbox = Inbox(on_change=lambda: changes.append(1))
    header = Header("req1:kv:0", 1, (TensorSpec.of(torch.zeros(4, 8)),))

    inbox.ignore("req1:kv:0")                         # the request was dropped before its KV came
    slot = inbox.on_header(header, "10.0.0.1:5000", "cpu")
    assert slot.buffers[0].shape == (4, 8)            # the bytes must land somewhere...
    inbox.on_complete(slot, 0.01)
    assert slot.buffers == [] and inbox.state("req1:kv:0") is None and inbox.poll("req1:kv:0") is None
    assert changes == [], "nobody is woken for a dropped message"

    again = inbox.on_header(header, "10.0.0.1:5000", "cpu")   # the mark is used up: a new message counts
    inbox.on_complete(again, 0.01)
    assert inbox.state("req1:kv:0") is SlotState.DONE
    inbox.ignore("req1:kv:0")                         # already here, unclaimed: gone at once
    assert inbox.state("req1:kv:0") is None

    inbox.ignore("never-comes")
    assert inbox.sweep(max_age_s=0.0) == 0
    late = inbox.on_header(Header("never-comes", 2, ()), "10.0.0.1:5000", "cpu")
    inbox.on_complete(late, 0.0)
    assert inbox.state("never-comes") is SlotState.DONE, "an aged-out mark no longer drops the key"
