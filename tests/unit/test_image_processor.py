"""epd's image preprocessing gives transformers' slow Qwen2-VL processor output bit for bit (the
vision tower sees exactly what it would under transformers), whatever the size or mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from epd.models.qwen2_vl.image_processor import ImageProcessor, pixel_values

SIZES = [(1280, 720), (640, 480), (37, 91), (4, 4), (3, 200), (28, 28), (1001, 77), (56, 3000), (2000, 2000)]


@pytest.fixture(scope="module", params=[(3136, 12845056), (3136, 50176)], ids=["qwen_default", "small_max"])
def processors(request, tmp_path_factory) -> tuple[ImageProcessor, Qwen2VLImageProcessorPil, str]:
    path = tmp_path_factory.mktemp("proc")
    min_px, max_px = request.param
    Qwen2VLImageProcessorPil(size={"shortest_edge": min_px, "longest_edge": max_px}, patch_size=14,
                             merge_size=2, temporal_patch_size=2).save_pretrained(path)
    return ImageProcessor(str(path), 2), Qwen2VLImageProcessorPil.from_pretrained(path), str(path)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_preprocess_equals_transformers(processors, mode) -> None:
    ours, theirs, _ = processors
    rng = np.random.default_rng(len(mode))
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        got = ours.preprocess(img)
        ref = theirs(images=[img], return_tensors="pt")
        assert torch.equal(got.pixel_values, ref["pixel_values"]), (w, h, mode)
        assert list(got.grid_thw) == ref["image_grid_thw"][0].tolist() and got.grid_thw == ours.grid_for(img)
        assert got.num_tokens == got.pixel_values.shape[0] // 4


def test_preprocess_many_keeps_order_and_values(processors) -> None:
    ours, _, _ = processors
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES[:5]]
    many = ours.preprocess_many(images)
    assert len(many) == len(images)
    for img, got in zip(images, many, strict=True):
        one = ours.preprocess(img)
        assert torch.equal(got.pixel_values, one.pixel_values) and got.grid_thw == one.grid_thw


def test_pixel_values_of_a_batch_are_each_images_values_in_order(processors) -> None:
    """What the vision tower receives for several images (8-bit patches looked up in one go, and a
    non-RGB image that took transformers' path) is transformers' pixel values, concatenated."""
    ours, theirs, _ = processors
    rng = np.random.default_rng(11)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES[:3]]
    images.insert(1, images[0].convert("L"))
    pre = ours.preprocess_many(images)
    assert pre[0].data.dtype == torch.uint8 and pre[1].spec is None   # both paths are in the batch
    ref = torch.cat([theirs(images=[im], return_tensors="pt")["pixel_values"] for im in images])
    assert torch.equal(pixel_values(pre, "cpu"), ref)
    assert torch.equal(pixel_values([pre[0], pre[2]], "cpu"), torch.cat([ref[:pre[0].pixel_values.shape[0]],
                                                                         pre[2].pixel_values]))


def test_a_resize_left_for_the_vision_towers_device_gives_the_same_values(processors) -> None:
    """Where the vision tower is on a GPU the resize waits for `pixel_values` (run here on the CPU,
    the same integer ops): preprocessing keeps the decoded image, and the values are unchanged."""
    _, theirs, path = processors
    later = ImageProcessor(path, 2, resize_on_device=True)
    assert later.resize_on_device
    rng = np.random.default_rng(13)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES[:4]]
    pre = later.preprocess_many(images)
    assert pre[0].resize_to is not None and tuple(pre[0].data.shape[:2]) == (720, 1280)
    ref = torch.cat([theirs(images=[im], return_tensors="pt")["pixel_values"] for im in images])
    assert torch.equal(pixel_values(pre, "cpu"), ref)
