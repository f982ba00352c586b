"""The resize that can run on the vision tower's GPU gives Pillow's bicubic bytes exactly (what
transformers' Qwen2-VL processor feeds the vision tower), whatever the sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from epd.media.pil_resize import bicubic_resize, matches_pillow

PAIRS = [((1280, 720), (1288, 728)),   # the usual 720p frame: both up a little
         ((640, 480), (644, 476)),     # width up, height down: Pillow 13 runs the vertical pass first
         ((300, 400), (280, 300)),     # both down, height by more than twice as many pixels
         ((400, 300), (300, 280)),     # both down, the width more
         ((1001, 77), (1008, 84)), ((37, 91), (56, 84)), ((3, 200), (28, 56)), ((1, 1), (28, 28)),
         ((2000, 1500), (1000, 700)), ((50, 60), (50, 90)), ((50, 60), (70, 60))]


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("src,dst", PAIRS)
def test_bicubic_resize_equals_pillow(src, dst, channels):
    assert matches_pillow()
    (w, h), (out_w, out_h) = src, dst
    pixels = np.random.default_rng(w * h).integers(0, 256, (h, w, channels), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(pixels if channels == 3 else pixels[..., 0]).resize(
        (out_w, out_h), resample=Image.BICUBIC)).reshape(out_h, out_w, channels)
    got = bicubic_resize(torch.from_numpy(pixels), out_h, out_w)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), ref)


def test_random_sizes_all_equal_pillow():
    assert matches_pillow()
    rng = np.random.default_rng(1)
    for _ in range(60):
        w, h, out_w, out_h = (int(x) for x in rng.integers(1, 120, 4))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), resample=Image.BICUBIC))
        assert np.array_equal(bicubic_resize(torch.from_numpy(pixels), out_h, out_w).numpy(), ref), (w, h, out_w, out_h)
