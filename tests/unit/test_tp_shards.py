"""How a tensor-parallel process cuts its piece out of a checkpoint's tensors (the loader's side of
`epd.layers.parallel`): rows or columns by the dimension each layer splits, a vocabulary that does
not divide padded with zero rows on the last process (their logits are cut before sampling), and a
tensor that cannot split refused with both shapes named. The engine-level test that two processes
give one process's tokens is tests/e2e/test_tensor_parallel.py."""

from __future__ import annotations

import pytest
import torch

from epd.layers.mlp import GatedMLP
from epd.layers.parallel import TPGroup, VocabParallelHead, set_group, shard_dims, shard_piece


@pytest.fixture
def rank():
    def place(r: int, size: int = 2) -> None:
        set_group(TPGroup(r, size))
    yield place
    set_group(TPGroup())


def test_each_rank_takes_its_rows_and_the_pieces_make_the_whole(rank):
    full = torch.arange(6 * 4.0).view(6, 4)
    pieces = []
    for r in range(2):
        rank(r)
        pieces.append(shard_piece(full, torch.Size([3, 4]), 0))
    assert torch.equal(torch.cat(pieces), full)
    rank(1)
    assert torch.equal(shard_piece(full, torch.Size([6, 2]), 1), full[:, 2:])


def test_a_vocabulary_that_does_not_divide_is_padded_on_the_last_rank(rank):
    full = torch.arange(7 * 2.0).view(7, 2)
    rank(1)
    head = VocabParallelHead(2, 7)
    assert head.weight.shape == (4, 2) and head.vocab_size == 7
    piece = shard_piece(full, head.weight.shape, 0)
    assert torch.equal(piece[:3], full[4:]) and torch.equal(piece[3], torch.zeros(2))


def test_a_tensor_that_does_not_split_is_refused_naming_the_shapes(rank):
    rank(0)
    with pytest.raises(ValueError, match=r"checkpoint shape \(6, 4\) does not split into 2 pieces of \(2, 4\)"):
        shard_piece(torch.zeros(6, 4), torch.Size([2, 4]), 0)


def test_layers_name_the_dimension_they_split(rank):
    from epd.config import TextConfig

    rank(0)
    cfg = TextConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=2,
                     num_kv_heads=2, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                     tie_word_embeddings=False)
    mlp = GatedMLP(cfg)
    assert mlp.gate_proj.weight.shape == (6, 8) and mlp.down_proj.weight.shape == (8, 6)
    assert shard_dims(mlp) == {"gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1}
    with pytest.raises(ValueError, match=r"tensor parallel size 2 does not divide the MLP width \(13\)"):
        GatedMLP(TextConfig(**{**cfg.__dict__, "intermediate_size": 13}))


def test_a_partial_sum_carries_the_bias_on_one_rank_only(rank):
    """A row-parallel projection whose caller sums the ranks' parts itself (reduce=False): the bias
    is in rank 0's part alone, so the sum holds it once."""
    from epd.layers.parallel import RowParallelLinear

    x = torch.ones(1, 2)
    parts = []
    for r in range(2):
        rank(r)
        layer = RowParallelLinear(4, 3, bias=True, reduce=False)
        torch.nn.init.ones_(layer.weight)
        torch.nn.init.constant_(layer.bias, 10.0)
        parts.append(layer(x))
    assert torch.equal(parts[0] + parts[1], torch.full((1, 3), 4.0 + 10.0))
