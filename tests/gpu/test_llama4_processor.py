"""Llama 4's image processor equals transformers' `Llama4ImageProcessor` (torchvision: on the GPU
host only) for sizes that take every path: one tile, upscaled and not, several tiles with a global
view, padding on either side, images too large for any grid: pixel values (bfloat16, bit for bit),
the tile grid, and the prompt's image tokens as transformers' `Llama4Processor` lays them out."""

from __future__ import annotations

import pytest
import torch
from support import noise_image

from epd.models.llama4.image_processor import Llama4ImageProcessor

pytestmark = pytest.mark.gpu   # the GPU host has torchvision (`-m gpu` runs there); elsewhere they skip

SIZES = [(336, 336), (200, 300), (300, 200), (1280, 720), (720, 1280), (50, 40), (4000, 300), (337, 336),
         (1000, 1000), (672, 336), (100, 3000), (513, 777)]   # (width, height)


@pytest.fixture(scope="module")
def theirs():
    pytest.importorskip("torchvision")
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor as Reference

    return Reference()


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pixel_values_and_grid_equal_transformers(theirs, size):
    image = noise_image(*size, seed=sum(size))
    expected = theirs(images=[image], return_tensors="pt")
    ours = Llama4ImageProcessor().preprocess(image)
    assert tuple(expected["aspect_ratios"][0].tolist()) == ours.grid
    assert expected["pixel_values"].dtype == ours.tiles.dtype == torch.bfloat16
    assert torch.equal(expected["pixel_values"], ours.tiles)


def test_prompt_tokens_equal_the_processors_layout(theirs):
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    layout = Llama4Processor._prompt_split_image
    ours = Llama4ImageProcessor()
    for grid in [(1, 1), (2, 3), (4, 4), (1, 16)]:
        assert "".join(ours.prompt_tokens(grid)) == layout(None, grid, ours.tokens_per_tile)   # self unused
