"""A KV pool for a model with cross-attention layers: token pages and image-row pages come from one
allocator and one buffer, a page costs its bytes once whichever kind it is (an image's rows cost
their own K/V bytes, not every layer's), pages never overlap, and the wire codec moves KV in and out
of these strided layer views exactly."""

from __future__ import annotations

import torch

from epd.engine.kv_pool import KVCache, KVCacheSpec
from kv_transfer.kv_codec import gather_kv, scatter_kv

# Llama-3.2-11B-Vision's text model: 40 layers, 8 of them cross-attention, 8 KV heads of 128
CROSS_11B = (3, 8, 13, 18, 23, 28, 33, 38)


def _spec(page_size: int = 16, dtype=torch.bfloat16, layers: int = 40, cross=CROSS_11B) -> KVCacheSpec:
    return KVCacheSpec(layers, 8, 128, page_size, dtype, cross)


def test_an_images_rows_cost_their_own_bytes_not_every_layers():
    spec = _spec()
    kv = KVCache(spec, 2, "meta")
    rows = 4 * 1601                                       # one image: 4 tiles of 1600 patches + a class token
    own = len(CROSS_11B) * 2 * rows * 8 * 128 * 2          # K and V of the rows in the 8 cross-attention layers
    held = kv.pool.pages_for_rows(rows) * spec.bytes_per_page()
    assert own <= held < own * 1.01
    assert kv.pool.cross_page_rows == 4 * 16               # 32 self-attention slots a page, 4 per cross layer
    tokens = 1000                                          # token pages hold the 32 self-attention layers only
    assert kv.pool.pages_for(tokens) * spec.bytes_per_page() < 32 * 2 * (tokens + 16) * 8 * 128 * 2


def test_pages_do_not_overlap_across_kinds_and_layers():
    spec = KVCacheSpec(5, 2, 4, 4, torch.float32, (1, 3))
    kv = KVCache(spec, 6, "cpu")
    for layer in kv.layers:
        layer.zero_()
    kv.layers[1][3].fill_(1.0)      # an image-row page in a cross-attention layer
    kv.layers[2][4].fill_(2.0)      # a token page in a self-attention layer
    for layer in kv.layers:
        for page in (0, 1, 2, 5):   # pages nobody wrote, in every layer's view
            assert not layer[page].any()
    assert (kv.layers[1][3] == 1).all() and (kv.layers[2][4] == 2).all()
    assert kv.layers[1][3].data_ptr() != kv.layers[2][4].data_ptr()


def test_the_wire_codec_round_trips_strided_layers():
    spec = KVCacheSpec(5, 2, 4, 4, torch.float32, (1, 3))
    src, dst = KVCache(spec, 8, "cpu"), KVCache(spec, 8, "cpu")
    for layer in src.layers:
        layer.copy_(torch.randn_like(layer))
    token_layers = [src.layers[i] for i in (0, 2, 4)]
    wire = gather_kv(token_layers, [5, 2, 7], 10)
    scatter_kv(wire, [dst.layers[i] for i in (0, 2, 4)], [1, 6, 3])
    for s_layer, d_layer in zip(token_layers, [dst.layers[i] for i in (0, 2, 4)], strict=True):
        for t in range(10):
            s_page, d_page = [5, 2, 7][t // 4], [1, 6, 3][t // 4]
            assert torch.equal(s_layer[s_page, :, t % 4], d_layer[d_page, :, t % 4])
    cross = [src.layers[i] for i in (1, 3)]
    rows = gather_kv(cross, [4], 3)                      # image rows: 4 rows a page here (k = 1)
    assert torch.equal(rows[0, 0], cross[0][4, 0, :3]) and torch.equal(rows[1, 1], cross[1][4, 1, :3])
