"""Llama-3.2-Vision image preprocessing against transformers' PIL processor: for tiny, extreme,
odd, square and large sizes our tiles equal transformers' pixel values bit for bit, and the
aspect ratio id, tile mask and tile count are its; the layout computed from the size alone (the
router's) is the one preprocessing produces; a request of two images with different tile counts
is padded and stacked as transformers stacks it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from support import noise_image

from epd.models.family import ImageLayout
from epd.models.mllama.image_processor import MllamaImageProcessor, choose_arrangement, tile_batch
from epd.models.mllama.tiny import write_tiny

SIZES = [(2, 2), (13, 29), (56, 56), (57, 55), (112, 56), (56, 112), (3, 700), (700, 3), (100, 300), (167, 941),
         (333, 333), (1000, 1000), (1920, 1080), (4000, 300)]   # (width, height); the tiny tiles are 56 px


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("mllama-tiny"))
    write_tiny("mllama", path, "tiny", weights=False)
    return path


@pytest.fixture(scope="module")
def hf_processor(checkpoint):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil.from_pretrained(checkpoint)


def _assert_batch_equal(ours, theirs, images) -> None:
    """Our TileBatch of a request's images == transformers' output for that request."""
    assert ours.pixel_values.dtype == torch.float32
    torch.testing.assert_close(ours.pixel_values, theirs["pixel_values"][0], atol=1e-6, rtol=0)
    assert torch.equal(ours.aspect_ratio_ids, theirs["aspect_ratio_ids"][0])
    assert torch.equal(ours.aspect_ratio_mask, theirs["aspect_ratio_mask"][0])
    assert [im.num_tiles for im in images] == theirs["num_tiles"][0]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_one_image_equals_transformers(checkpoint, hf_processor, size):
    width, height = size
    image = noise_image(width, height, seed=width + height)
    ours = MllamaImageProcessor(checkpoint)
    pre = ours.preprocess_many([image])[0]
    assert pre.layout == ours.layout(image)
    ours.check_layout(pre.layout)
    _assert_batch_equal(tile_batch([pre], "cpu"), hf_processor(images=[[image]], return_tensors="pt"), [pre])
    assert pre.pixel_values.shape == (pre.num_tiles, 3, 56, 56)


def test_two_images_of_different_tile_counts(checkpoint, hf_processor):
    images = [noise_image(300, 90, seed=1), noise_image(40, 40, seed=2)]
    ours = MllamaImageProcessor(checkpoint).preprocess_many(images)
    assert [im.num_tiles for im in ours] == [4, 1]
    theirs = hf_processor(images=[images], return_tensors="pt")
    assert theirs["pixel_values"].shape[:3] == (1, 2, 4)          # every image padded to max_image_tiles
    _assert_batch_equal(tile_batch(ours, "cpu"), theirs, ours)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_modes_convert_as_transformers(checkpoint, hf_processor, mode):
    rgba = noise_image(90, 70, seed=3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((90, 70)))
    image = rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)
    pre = MllamaImageProcessor(checkpoint).preprocess(image)
    _assert_batch_equal(tile_batch([pre], "cpu"), hf_processor(images=[[image]], return_tensors="pt"), [pre])


def test_layout_checks_and_content_keys(checkpoint):
    proc = MllamaImageProcessor(checkpoint)
    wide = proc.layout(noise_image(200, 50))
    assert wide == ImageLayout(1, (4, 4, 1, 4))                  # (tiles, ratio id, high, wide)
    assert ImageLayout.from_wire(wide.to_wire()) == wide
    for bad in (ImageLayout(1, (4, 5, 1, 4)), ImageLayout(1, (3, 4, 1, 4)), ImageLayout(2, (4, 4, 1, 4)),
                ImageLayout(1, (9, 9, 3, 3)), ImageLayout(1, (1, 1))):
        with pytest.raises(ValueError):
            proc.check_layout(bad)
    with pytest.raises(ValueError):
        proc.preprocess(noise_image(50, 200), wide)
    a, b = proc.preprocess_many([noise_image(80, 60, seed=4), noise_image(80, 60, seed=5)])
    assert a.content_key() == proc.preprocess(noise_image(80, 60, seed=4)).content_key() != b.content_key()


def test_real_tile_size_arrangements():
    """At 560-px tiles and 4 tiles: a 1080p frame takes 2 x 2, a small image one tile, a panorama
    a row of 4, a 2:1 image 1 x 2 (no upscale needed beyond the smallest canvas holding it)."""
    assert choose_arrangement(1080, 1920, 4, 560) == (2, 2)
    assert choose_arrangement(300, 400, 4, 560) == (1, 1)
    assert choose_arrangement(500, 4000, 4, 560) == (1, 4)
    assert choose_arrangement(560, 1120, 4, 560) == (1, 2)
