"""Declared messages checked on receipt: a cross-attention model's hand-over fields (the image
layouts decode is sent, the image rows' count) round-trip, and out-of-range ones are refused with
the field named."""

from __future__ import annotations

import pytest

from epd import protocol


def test_a_decode_request_carries_the_image_layouts():
    msg = protocol.DecodeRequest("r1", [1, 2, 3], {}, "p0", "abc", "127.0.0.1:1", images=[[1, 2, 3, 1, 2]])
    assert protocol.decode(protocol.encode(msg)) == msg


def test_too_many_images_for_decode_are_refused():
    msg = protocol.DecodeRequest("r1", [1], {}, "p0", "abc", "h:1", images=[[1]] * (protocol.MAX_IMAGES + 1))
    with pytest.raises(protocol.ProtocolError, match="too many images"):
        protocol.decode(protocol.encode(msg))


@pytest.mark.parametrize("meta", [
    protocol.data_meta(protocol.CrossRows("r1", -1)),
    protocol.data_meta(protocol.CrossRows("r1", protocol.MAX_TOKENS + 1)),
    protocol.data_meta(protocol.HandOver("r1", cross_rows=-5)),
])
def test_image_row_counts_out_of_range_are_refused(meta):
    cls = protocol.MESSAGE_TYPES[meta["tag"]]
    with pytest.raises(protocol.ProtocolError, match="image rows"):
        protocol.read_data_meta(meta, cls, "r1")


def test_image_rows_round_trip_under_their_request_only():
    meta = protocol.data_meta(protocol.CrossRows("r1", 6404))
    assert protocol.read_data_meta(meta, protocol.CrossRows, "r1").rows == 6404
    with pytest.raises(protocol.ProtocolError, match="under 'r2'"):
        protocol.read_data_meta(meta, protocol.CrossRows, "r2")
