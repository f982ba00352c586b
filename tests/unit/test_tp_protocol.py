"""The tensor-parallel group's messages (`epd.tp_protocol`) are declared types checked on receipt:
a step survives the trip unchanged; a frame with an unknown tag, a field of the wrong type or an
int64 array of stray bytes is refused naming what is wrong, before a worker acts on it."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from epd.protocol import ProtocolError
from epd.tp_protocol import TPCrossChunk, TPGatherKV, TPStep, array, decode, encode, ints


def _step() -> TPStep:
    return TPStep(ids=ints([5, 6, 7]), positions=ints([0, 1, 2]), position_rows=1, rows=[2], qo_lens=[3],
                  kv_lens=[3], table_lens=[1], tables=ints([4]), page_size=16, slots=ints([64, 65, 66]),
                  spliced=True, cross=[TPCrossChunk(3)])


def test_a_step_arrives_as_sent():
    got = decode(encode(_step()))
    assert got == _step() and array(got.ids).tolist() == [5, 6, 7]


def test_a_field_of_the_wrong_type_is_refused_naming_it():
    body = dataclasses.asdict(_step()) | {"rows": ["2"]}
    with pytest.raises(ProtocolError, match=r"TPStep\.rows\[\]: expected int"):
        decode(msgpack.packb([1, body], use_bin_type=True))
    with pytest.raises(ProtocolError, match="missing fields"):
        decode(msgpack.packb([4, {"layers": [0]}], use_bin_type=True))
    assert decode(encode(TPGatherKV([0, 1], ints([3]), 5, 0))).n == 5


def test_unknown_tags_and_stray_bytes_are_refused():
    with pytest.raises(ProtocolError, match="unknown tensor-parallel message tag 99"):
        decode(msgpack.packb([99, {}]))
    with pytest.raises(ProtocolError, match="malformed"):
        decode(b"\xc1")
    with pytest.raises(ProtocolError, match="7 bytes are not int64 values"):
        array(b"\0" * 7)
