"""`epd serve` on one GPU: every node's share fits the GPU together, decode gets the larger part,
and a user who sized the pools decides."""

from __future__ import annotations

import pytest

from deploy.gpu_shares import ENCODER_SHARE, TOTAL, describe, gpu_shares, user_sized


@pytest.mark.parametrize(("encoders", "prefills", "decodes"), [(1, 1, 1), (1, 1, 2), (2, 2, 2), (0, 1, 1), (1, 0, 1)])
def test_the_shares_of_every_node_fit_one_gpu_together(encoders, prefills, decodes):
    shares = gpu_shares(encoders, prefills, decodes)
    used = encoders * ENCODER_SHARE + prefills * shares.get("prefill", 0) + decodes * shares.get("decode", 0)
    assert used <= TOTAL + 1e-3
    assert all(share > 0.1 for share in shares.values())
    if prefills and decodes:
        assert shares["decode"] * decodes > shares["prefill"] * prefills


def test_the_defaults_leave_each_node_room_for_a_7b_model_on_80_gb():
    shares = gpu_shares(1, 1, 1)
    weights_gib = 16.6   # Qwen2.5-VL-7B's language model in bf16
    assert all(share * 80 - weights_gib > 8 for share in shares.values())   # KV and activations beside it
    assert "prefill 0.328 (26.2 GiB) each" in describe(shares, 1, 80 * 2**30)


def test_a_user_who_sized_the_pools_decides():
    assert user_sized(["--gpu-memory-utilization", "0.3"]) and user_sized(["--kv-cache-tokens=4096"])
    assert not user_sized(["--max-model-len", "4096", "--http-port", "0"])


def test_too_many_encoders_for_one_gpu_is_refused():
    with pytest.raises(ValueError, match="give the nodes --gpu-memory-utilization"):
        gpu_shares(9, 1, 1)

