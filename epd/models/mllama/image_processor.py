"""Image preprocessing for Llama-3.2-Vision (`mllama`), equal to transformers' PIL/numpy processor.

An image is laid out on a canvas of square tiles (`tile` px, 560 on the real checkpoints): among
the tile arrangements of at most `max_image_tiles` tiles, the one needing the smallest upscale
(else the smallest downscale) to hold the image, ties going to the smallest canvas. The image is
resized to fit that canvas keeping its aspect ratio (never below one tile per side), padded with
black at its right and bottom, rescaled and normalized, and cut into tiles in row-major order.

In the prompt an image is ONE `<|image|>` token (the text model reads the image through
cross-attention), so the layout's `num_tokens` is 1; its dims are this family's numbers:
(num_tiles, aspect_ratio_id, tiles_high, tiles_wide). The aspect ratio id is the arrangement's
1-based index in `supported_aspect_ratios` (0 is a padding image).

Preprocessing only resizes and pads the 8-bit image (`MllamaPixels.canvas`); `tile_batch` cuts the
tiles and turns 8-bit values into floats by table lookup on the vision tower's device (each output
value depends only on the 8-bit input and its channel, so one table of 3 x 256 values holds the
rescale + normalize), and pads every image to `max_image_tiles` tiles of zeros, as transformers
stacks them.

Lifecycle: `MllamaImageProcessor(path)` reads preprocessor_config.json once; per request the
router calls `layout` (size only), the encoder `preprocess_many`, then its vision encoder
`tile_batch` on the images of one forward.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from epd.media.loading import content_hash
from epd.models.family import ImageLayout, preprocess_on_threads

_BILINEAR = 2   # PIL's value (transformers' default resampling for this processor)
_DEFAULTS = {"size": {"height": 224, "width": 224}, "max_image_tiles": 4, "resample": _BILINEAR,
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (tiles_high, tiles_wide) of at most `max_tiles` tiles, in id order (id = index + 1)."""
    return tuple((high, wide) for high in range(1, max_tiles + 1) for wide in range(1, max_tiles + 1)
                 if high * wide <= max_tiles)


def choose_arrangement(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(tiles_high, tiles_wide) of the canvas for an image of `height` x `width`."""
    # (scale the image needs to fit the canvas, canvas area in tiles, arrangement), in id order
    options = [(min(high * tile / height, wide * tile / width), high * wide, (high, wide))
               for high, wide in supported_aspect_ratios(max_tiles)]
    upscales = [scale for scale, _, _ in options if scale >= 1]
    best = min(upscales) if upscales else max(scale for scale, _, _ in options)
    # min() keeps the first of equal areas, as numpy's argmin does
    return min((option for option in options if option[0] == best), key=lambda option: option[1])[2]


def fitted_size(height: int, width: int, canvas_height: int, canvas_width: int, tile: int) -> tuple[int, int]:
    """(height, width) the image is resized to: the side that limits the scale fills the canvas
    (each side first brought within [tile, canvas]), the other follows the aspect ratio."""
    target_height = min(max(height, tile), canvas_height)
    target_width = min(max(width, tile), canvas_width)
    scale_h, scale_w = target_height / height, target_width / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_h) or 1, target_width)


@dataclass(frozen=True, eq=False)
class PixelSpec:
    """How 8-bit canvases become the vision tower's input (one per processor)."""
    table: torch.Tensor   # float32 [3 * 256]: the value of 8-bit v in channel c at c * 256 + v
    tile: int
    max_tiles: int


@dataclass
class MllamaPixels:
    layout: ImageLayout    # num_tokens 1; dims (num_tiles, aspect_ratio_id, tiles_high, tiles_wide)
    canvas: torch.Tensor   # uint8 [tiles_high * tile, tiles_wide * tile, 3]: the resized image, black right/below
    spec: PixelSpec

    @property
    def num_tiles(self) -> int:
        return self.layout.dims[0]

    @property
    def aspect_ratio_id(self) -> int:
        return self.layout.dims[1]

    def content_key(self) -> str:
        """The encoder input's identity: equal canvases and layouts give equal cross-attention states."""
        data = self.canvas.contiguous()
        return content_hash(f"mllama:{self.layout.to_wire()}:{tuple(data.shape)}:", data.numpy())

    @property
    def pixel_values(self) -> torch.Tensor:
        """float32 [num_tiles, 3, tile, tile] on the CPU (the tiles without padding)."""
        return tile_batch([self], "cpu").pixel_values[0, :self.num_tiles]


@dataclass
class TileBatch:
    """The vision tower's input for a list of images (transformers' layout, without its batch axis)."""
    pixel_values: torch.Tensor       # float32 [images, max_tiles, 3, tile, tile]; padding tiles 0
    aspect_ratio_ids: torch.Tensor   # int64 [images]
    aspect_ratio_mask: torch.Tensor  # int64 [images, max_tiles]: 1 for an image's tiles (tile 0 always)


def tile_batch(images: list[MllamaPixels], device: torch.device | str) -> TileBatch:
    """The images' tiles, built on `device` (8-bit canvases copied there, cut, looked up)."""
    spec = images[0].spec
    size, channels = spec.tile, 3
    pixels = torch.zeros(len(images), spec.max_tiles, channels, size, size, device=device)
    table = spec.table.to(device)
    offsets = torch.arange(0, channels * 256, 256, device=device).view(1, channels, 1, 1)
    for i, im in enumerate(images):
        high, wide = im.layout.dims[2:]
        canvas = im.canvas.to(device, non_blocking=True)
        tiles = canvas.view(high, size, wide, size, channels).permute(0, 2, 4, 1, 3).reshape(-1, channels, size, size)
        pixels[i, :high * wide] = table[tiles.long() + offsets]
    ids = torch.tensor([im.aspect_ratio_id for im in images], dtype=torch.long, device=device)
    counts = torch.tensor([max(im.num_tiles, 1) for im in images], device=device)
    mask = (torch.arange(spec.max_tiles, device=device)[None] < counts[:, None]).long()
    return TileBatch(pixels, ids, mask)


def value_table(config: dict[str, Any]) -> np.ndarray:
    """[3 * 256] float32: 8-bit value v of channel c rescaled (in float64, then to float32) and
    normalized (in float32), the arithmetic of transformers' numpy path, at c * 256 + v."""
    values = np.arange(256, dtype=np.float64)
    if config["do_rescale"]:
        values = values * config["rescale_factor"]
    values = np.broadcast_to(values.astype(np.float32), (3, 256))
    if config["do_normalize"]:
        mean = np.asarray(config["image_mean"], dtype=np.float32).reshape(3, 1)
        std = np.asarray(config["image_std"], dtype=np.float32).reshape(3, 1)
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited on white (what transformers' processor does to other modes)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_config(path: str) -> dict[str, Any]:
    """The checkpoint's preprocessor_config.json over transformers' defaults for this processor."""
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        config = {**_DEFAULTS, **json.load(f)}
    size = config["size"]
    if size.get("height") != size.get("width") or not size.get("height"):
        raise ValueError(f"mllama tiles are square: preprocessor size {size}")
    if not config.get("do_resize", True) or not config.get("do_pad", True):
        raise ValueError("mllama's image processor always resizes and pads (do_resize / do_pad false)")
    if int(config["max_image_tiles"]) < 1:
        raise ValueError(f"max_image_tiles {config['max_image_tiles']}")
    return config


class MllamaImageProcessor:
    def __init__(self, path: str) -> None:
        config = read_config(path)
        self.tile = int(config["size"]["height"])
        self.max_tiles = int(config["max_image_tiles"])
        self.resample = int(config["resample"])
        self.spec = PixelSpec(torch.from_numpy(value_table(config)), self.tile, self.max_tiles)

    def layout(self, image: Image.Image, count: int = 1) -> ImageLayout:
        """(An image's tiling does not depend on the other images of its request.)"""
        return self.layout_for(image.height, image.width)

    def layout_for(self, height: int, width: int) -> ImageLayout:
        high, wide = choose_arrangement(height, width, self.max_tiles, self.tile)
        ratio_id = supported_aspect_ratios(self.max_tiles).index((high, wide)) + 1
        return ImageLayout(1, (high * wide, ratio_id, high, wide))

    def check_layout(self, layout: ImageLayout) -> None:
        """ValueError unless `layout` is one this processor can produce."""
        ratios = supported_aspect_ratios(self.max_tiles)
        if layout.num_tokens != 1 or len(layout.dims) != 4:
            raise ValueError(f"an mllama image layout is [1, tiles, ratio id, high, wide], got {layout.to_wire()}")
        tiles, ratio_id, high, wide = layout.dims
        if not 1 <= ratio_id <= len(ratios) or ratios[ratio_id - 1] != (high, wide) or tiles != high * wide:
            raise ValueError(f"inconsistent mllama image layout {layout.to_wire()}")

    def preprocess(self, image: Image.Image, layout: ImageLayout | None = None) -> MllamaPixels:
        want = self.layout_for(image.height, image.width)
        if layout is not None and layout != want:
            raise ValueError(f"image layout {layout.to_wire()} is not for a {image.width}x{image.height} image")
        _, _, high, wide = want.dims
        new_height, new_width = fitted_size(image.height, image.width, high * self.tile, wide * self.tile, self.tile)
        image = to_rgb(image)
        if (new_width, new_height) != image.size:
            image = image.resize((new_width, new_height), resample=self.resample)
        canvas = np.zeros((high * self.tile, wide * self.tile, 3), dtype=np.uint8)
        canvas[:new_height, :new_width] = np.asarray(image)
        return MllamaPixels(want, torch.from_numpy(canvas), self.spec)

    def preprocess_many(self, images: list[Image.Image],
                        layouts: list[ImageLayout] | None = None) -> list[MllamaPixels]:
        todo = list(zip(images, layouts or [None] * len(images), strict=True))
        return preprocess_on_threads(lambda item: self.preprocess(*item), todo)
