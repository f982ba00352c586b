"""Llama 4's vision encoder + projector against transformers on the tiny checkpoint: the same tiles'
pixel values give transformers' `get_image_features` (the projected `<|patch|>` rows, tile after
tile) in float32; the pixel shuffle keeps each 2x2 block of patches together."""

from __future__ import annotations

import pytest
import torch

from epd.models.llama4.vision import Llama4Vision, pixel_shuffle
from epd.models.weights import iter_weights, load_into


@pytest.fixture(scope="module")
def checkpoint(tiny_models) -> str:
    return tiny_models["llama4"]   # the session's tiny checkpoint (epd tiny-model llama4)


def test_vision_rows_equal_transformers(checkpoint) -> None:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    hf = Llama4Config.from_pretrained(checkpoint)
    ours = Llama4Vision(hf)
    load_into(ours, ((name, read()) for name, read in iter_weights(checkpoint)
                     if name.startswith(("vision_model.", "multi_modal_projector."))))
    ref = Llama4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    size = hf.vision_config.image_size
    tiles = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref.get_image_features(pixel_values=tiles).pooler_output
        got = ours(tiles)
    assert got.shape == (3 * 4, hf.text_config.hidden_size)
    torch.testing.assert_close(got, expected.reshape(got.shape), rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_merges_two_by_two_blocks() -> None:
    side, channels = 4, 3
    grid = torch.arange(side * side * channels, dtype=torch.float32).view(1, side * side, channels)
    out = pixel_shuffle(grid, 0.5)
    assert out.shape == (1, 4, 12)
    first = set(out[0, 0].tolist())                    # the top-left output token: patches (0,0) (0,1) (1,0) (1,1)
    block = {v for r in (0, 1) for c in (0, 1) for v in grid[0, r * side + c].tolist()}
    assert first == block
