"""gather_kv / scatter_kv: a request's KV survives pool -> wire -> pool bit for bit,
whatever the page sizes and page tables on either side."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.kv_codec import empty_wire, gather_kv, kind_groups, layer_groups, scatter_kv, tokens_needed

HEADS, HEAD_DIM = 2, 8


def make_pool(num_layers: int, num_pages: int, page_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    # one tensor per layer: [num_pages, 2, page_size, kv_heads, head_dim], filled with noise
    return [torch.randn(num_pages, 2, page_size, HEADS, HEAD_DIM).to(dtype) for _ in range(num_layers)]


def write_reference(pool: list[torch.Tensor], truth: torch.Tensor, pages: list[int]) -> None:
    """Place token-major KV `truth` [layers, 2, tokens, h, d] into pages, one token at a time."""
    page_size = pool[0].shape[2]
    for layer, cache in enumerate(pool):
        for tok in range(truth.shape[2]):
            cache[pages[tok // page_size], :, tok % page_size] = truth[layer, :, tok]


def read_reference(pool: list[torch.Tensor], pages: list[int], num_tokens: int) -> torch.Tensor:
    page_size = pool[0].shape[2]
    return torch.stack(
        [
            torch.stack([cache[pages[t // page_size], :, t % page_size] for t in range(num_tokens)], dim=1)
            for cache in pool
        ]
    )


def random_pages(num_pages: int, needed: int, gen: torch.Generator) -> list[int]:
    """Distinct pages in random order, never the reserved dummy page 0."""
    return (torch.randperm(num_pages - 1, generator=gen)[:needed] + 1).tolist()


@pytest.mark.parametrize("num_tokens", [1, 4, 37, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_page_size_4_to_16(num_tokens: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    layers = 3
    truth = torch.randn(layers, 2, num_tokens, HEADS, HEAD_DIM, generator=gen).to(dtype)

    src = make_pool(layers, num_pages=40, page_size=4, dtype=dtype)
    src_pages = random_pages(40, -(-num_tokens // 4), gen)
    write_reference(src, truth, src_pages)

    wire = gather_kv(src, torch.tensor(src_pages), num_tokens)
    assert wire.shape == (layers, 2, num_tokens, HEADS, HEAD_DIM) and wire.is_contiguous()
    assert torch.equal(wire.view(torch.uint8), truth.view(torch.uint8))

    dst = make_pool(layers, num_pages=12, page_size=16, dtype=dtype)
    before = [c.clone() for c in dst]
    dst_pages = random_pages(12, -(-num_tokens // 16), gen)
    scatter_kv(wire, dst, dst_pages)

    got = read_reference(dst, dst_pages, num_tokens)
    assert torch.equal(got.view(torch.uint8), truth.view(torch.uint8))
    # Nothing outside the request's token slots changed.
    for cache, old in zip(dst, before, strict=True):
        mask = torch.ones(cache.shape[0], cache.shape[2], dtype=torch.bool)
        for t in range(num_tokens):
            mask[dst_pages[t // 16], t % 16] = False
        assert torch.equal(cache.permute(0, 2, 1, 3, 4)[mask], old.permute(0, 2, 1, 3, 4)[mask])


def test_round_trip_16_to_4_into_preallocated_wire() -> None:
    gen = torch.Generator().manual_seed(7)
    truth = torch.randn(2, 2, 50, HEADS, HEAD_DIM, generator=gen).to(torch.float16)
    src = make_pool(2, 8, 16, torch.float16)
    pages = random_pages(8, 4, gen)
    write_reference(src, truth, pages)
    out = empty_wire(2, 50, HEADS, HEAD_DIM, torch.float16)
    assert gather_kv(src, pages, 50, out=out) is out
    dst = make_pool(2, 30, 4, torch.float16)
    dst_pages = random_pages(30, 13, gen)
    scatter_kv(out, dst, torch.tensor(dst_pages, dtype=torch.int32))
    assert torch.equal(gather_kv(dst, dst_pages, 50), truth)


def test_layer_groups_cover_every_layer_once() -> None:
    groups = layer_groups(28, 8)
    assert [list(g) for g in groups][-1] == [24, 25, 26, 27]
    assert [layer for g in groups for layer in g] == list(range(28))
    assert layer_groups(4, 8) == [range(0, 4)]
    with pytest.raises(ValueError):
        layer_groups(4, 0)


def test_short_page_table_is_refused() -> None:
    pool = make_pool(1, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="need 3 pages"):
        gather_kv(pool, [1, 2], num_tokens=9)


def test_wire_that_does_not_fit_the_pool_is_refused() -> None:
    pool = make_pool(2, 8, 4, torch.float32)
    with pytest.raises(ValueError):
        scatter_kv(torch.zeros(3, 2, 4, HEADS, HEAD_DIM), pool, [1])  # 3 layers into 2
    with pytest.raises(ValueError):
        scatter_kv(torch.zeros(2, 2, 4, HEADS + 1, HEAD_DIM), pool, [1])  # wrong head count
    with pytest.raises(ValueError):
        scatter_kv(torch.zeros(2, 2, 4, HEADS, HEAD_DIM, dtype=torch.float16), pool, [1])  # dtype


def test_chunked_layers_hand_over_only_the_last_chunk() -> None:
    """A chunked layer's decode reads only the prompt's tokens in the chunk the first generated token
    falls in: groups keep one kind each, and a group moves from that token on."""
    assert tokens_needed(100, None) == 0 and tokens_needed(100, 8) == 96 and tokens_needed(96, 8) == 96
    chunks = [8, 8, None, 8, 8, None]
    assert kind_groups(chunks, 8) == [[0, 1, 3, 4], [2, 5]]   # in the order their last layer completes
    assert kind_groups(chunks, 2) == [[0, 1], [3, 4], [2, 5]]
    assert kind_groups([None] * 5, 2) == [list(r) for r in layer_groups(5, 2)]
    src, dst = torch.randn(6, 2, 4, 2, 8), torch.zeros(9, 2, 4, 2, 8)
    wire = gather_kv([src], [5, 0, 3, 1], 5, first=10)          # tokens 10..14: pages 3 (10, 11) and 1 (12..14)
    assert torch.equal(wire[0, :, 0], src[3, :, 2]) and torch.equal(wire[0, :, 4], src[1, :, 2])
    scatter_kv(wire, [dst], [8, 7, 6, 2], first=10)
    assert torch.equal(dst[6, :, 2:4], src[3, :, 2:4]) and torch.equal(dst[2, :, :3], src[1, :, :3])
    assert not dst[8].any() and not dst[7].any()
