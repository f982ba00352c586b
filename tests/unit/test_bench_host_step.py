"""bench.host_step: the host's share of a decode step, on a tiny checkpoint."""

from __future__ import annotations

from bench.host_step import measure


def test_host_step_times_each_part_of_a_decode_step(tiny_models):
    row = measure(tiny_models["qwen2_5_vl"], batch=3, device="cpu", rounds=1, steps=4)
    parts = ("schedule_ms", "stage_inputs_ms", "argmax_and_copy_ms", "settle_tokens_ms")
    assert row["batch"] == 3 and row["step_ms"] > 0
    assert all(row[p] > 0 for p in parts)
    assert sum(row[p] for p in parts) <= row["step_ms"], "the parts are inside the step"
