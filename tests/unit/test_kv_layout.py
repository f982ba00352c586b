"""KVLayout: the hash pairs identical layouts only, and a refusal names what differs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from kv_transfer.layout import KVLayout, LayoutMismatchError

ROOT = Path(__file__).resolve().parents[2]


def make(**overrides: object) -> KVLayout:
    base = dict(
        model_id="Qwen/Qwen2-VL-2B-Instruct",
        dtype="bfloat16",
        num_layers=28,
        num_kv_heads=2,
        head_dim=128,
        tp_rank=0,
        tp_size=1,
    )
    base.update(overrides)
    return KVLayout(**base)  # type: ignore[arg-type]


def test_equal_layouts_hash_equal_and_pair() -> None:
    a, b = make(), make()
    assert a.layout_hash() == b.layout_hash()
    a.check_compatible(b)  # no exception


def test_hash_is_stable_across_processes() -> None:
    """Nodes compare hashes published by other processes: no per-process salt may leak in."""
    code = (
        "from kv_transfer.layout import KVLayout;"
        "print(KVLayout('Qwen/Qwen2-VL-2B-Instruct','bfloat16',28,2,128,0,1).layout_hash())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert out.stdout.strip() == make().layout_hash()


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_id", "llava-hf/llava-1.5-7b-hf"),
        ("dtype", "float16"),
        ("num_layers", 27),
        ("num_kv_heads", 4),
        ("head_dim", 64),
        ("tp_rank", 1),
        ("tp_size", 4),
        ("cross_layers", (3, 8)),
        ("chunked_layers", (0, 1, 2)),
        ("attention_chunk_size", 8192),
    ],
)
def test_any_field_change_changes_hash_and_is_named(field: str, value: object) -> None:
    ours = make(tp_size=2) if field == "tp_rank" else make()
    theirs = dataclasses.replace(ours, **{field: value})
    assert ours.layout_hash() != theirs.layout_hash()
    with pytest.raises(LayoutMismatchError) as err:
        ours.check_compatible(theirs, "prefill", "decode")
    assert f"{field} prefill={getattr(ours, field)!r} decode={value!r}" in str(err.value)


def test_mismatch_message_example_and_all_fields_listed() -> None:
    with pytest.raises(LayoutMismatchError, match=r"KV layout mismatch: num_kv_heads prefill=2 decode=4$"):
        make().check_compatible(make(num_kv_heads=4), "prefill", "decode")
    with pytest.raises(ValueError) as err:  # LayoutMismatchError is a ValueError
        make().check_compatible(make(dtype="float16", head_dim=64), "prefill", "decode")
    assert "dtype prefill='bfloat16' decode='float16'" in str(err.value)
    assert "head_dim prefill=128 decode=64" in str(err.value)


def test_dict_round_trip_through_msgpack() -> None:
    layout = make(tp_rank=1, tp_size=2)
    wire = msgpack.packb(layout.to_dict())
    back = KVLayout.from_dict(msgpack.unpackb(wire))
    assert back == layout and back.layout_hash() == layout.layout_hash()


@pytest.mark.parametrize(
    "overrides",
    [{"dtype": "bf16"}, {"num_layers": 0}, {"head_dim": -1}, {"tp_rank": 2, "tp_size": 2}],
)
def test_invalid_layouts_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make(**overrides)


def test_from_dict_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="page_size"):
        KVLayout.from_dict({**make().to_dict(), "page_size": 16})


def test_a_layout_with_image_rows_round_trips_through_json_and_msgpack() -> None:
    import json

    layout = make(cross_layers=(3, 8, 13))
    assert KVLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    assert KVLayout.from_dict(msgpack.unpackb(msgpack.packb(layout.to_dict()))).layout_hash() == layout.layout_hash()
    with pytest.raises(ValueError, match="cross_layers"):
        make(cross_layers=(28,))
