"""`epd serve`'s GPU placement (deploy/gpu_placement.py): which GPU each node runs on and its share
of that GPU's memory, for the splits the multi-GPU runs compare (2 and 4 GPUs)."""

from __future__ import annotations

import pytest

from deploy.gpu_placement import describe, place, shared_gpus
from deploy.gpu_shares import TOTAL, gpu_shares


def _where(placements):
    return sorted((p.role, p.gpus) for p in placements)


def _fits(placements):
    """The shares on each GPU (encoders counted as gpu_shares counts them) stay within TOTAL."""
    for gpu in {g for p in placements for g in p.gpus}:
        here = [p for p in placements if gpu in p.gpus]
        encoders = sum(p.role == "encoder" for p in here)
        assert sum(p.share for p in here if p.share is not None) + 0.08 * encoders <= TOTAL + 1e-6, here


def test_one_gpu_gives_every_node_the_shares_of_one_gpu():
    placements = place([0], {"encoder": 1, "prefill": 1, "decode": 1})
    assert {p.gpu for p in placements} == {0}
    assert {p.role: p.share for p in placements} == {"encoder": None, **gpu_shares(1, 1, 1)}
    assert shared_gpus(placements) == [0]


def test_two_gpus_put_the_encoder_with_prefill_and_decode_alone():
    placements = place([0, 1], {"encoder": 1, "prefill": 1, "decode": 1})
    assert _where(placements) == [("decode", (1,)), ("encoder", (0,)), ("prefill", (0,))]
    decode = next(p for p in placements if p.role == "decode")
    assert decode.share == gpu_shares(0, 0, 1)["decode"] == pytest.approx(TOTAL)   # the whole GPU
    assert shared_gpus(placements) == [0]
    _fits(placements)


@pytest.mark.parametrize(("prefills", "decodes"), [(1, 2), (2, 1)])
def test_four_gpus_give_each_node_of_a_split_its_own(prefills, decodes):
    placements = place([0, 1, 2, 3], {"encoder": 1, "prefill": prefills, "decode": decodes})
    assert sorted(p.gpu for p in placements) == [0, 1, 2, 3]
    assert not shared_gpus(placements)
    assert all(p.share == pytest.approx(TOTAL) for p in placements if p.role != "encoder")


def test_colocated_nodes_take_one_gpu_each_and_share_when_they_outnumber_the_gpus():
    assert _where(place([0, 1], {"colocated": 2})) == [("colocated", (0,)), ("colocated", (1,))]
    crowded = place([2, 3], {"colocated": 3})
    assert [p.gpu for p in crowded] == [2, 3, 2]
    assert shared_gpus(crowded) == [2]
    assert [p.share for p in crowded if p.gpu == 2] == [gpu_shares(0, 0, 0, 2)["colocated"]] * 2
    _fits(crowded)


def test_tensor_parallel_nodes_take_gpus_in_a_row():
    placements = place([0, 1, 2, 3], {"encoder": 1, "prefill": 1, "decode": 1}, tensor_parallel=2)
    assert _where(placements) == [("decode", (2, 3)), ("encoder", (0,)), ("prefill", (0, 1))]
    with pytest.raises(ValueError, match="tensor parallel size 4 needs 4 GPUs; 2 given"):
        place([0, 1], {"prefill": 1, "decode": 1}, tensor_parallel=4)


def test_the_start_up_line_names_each_gpu_and_its_nodes():
    line = describe(place([0, 1], {"encoder": 1, "prefill": 1, "decode": 1}))
    assert line.startswith("nodes on GPUs") and "GPU 0: prefill" in line and "GPU 1: decode 0.900" in line
