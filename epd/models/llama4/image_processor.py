"""Llama 4's image processor without torchvision: what transformers' `Llama4ImageProcessor` computes.

For an image of h x w pixels, with tiles of `tile` px (336) and at most `max_patches` tiles (16):
1. the canvas: among the tile grids (rows, cols) with rows * cols <= max_patches, the one whose
   scale min(rows * tile / h, cols * tile / w) is the smallest that is >= 1 (the largest < 1 when
   none is), the smallest area among equal scales, the grids listed as transformers lists them;
2. the image resized, aspect kept, to fit min(max(h, tile), canvas height) x min(max(w, tile), canvas
   width) (never upscaled past one tile), with bilinear antialiased interpolation on the 8-bit pixels
   (torch's, which torchvision's resize calls for them), then padded with black to the canvas at
   the bottom and right;
3. values: 8-bit -> bfloat16, times 1/255, then (x - 0.5) / 0.5, in bfloat16 (as transformers
   rescales and normalizes for this model);
4. the canvas cut into its tiles, row by row; with more than one tile, a global view follows: the
   whole image resized to tile x tile (aspect not kept), normalized the same way.
In the prompt an image is `<|image_start|>`, with several tiles each tile's `<|patch|>` run (tile
tokens = (tile / patch)^2 * pixel_shuffle_ratio^2), `<|tile_x_separator|>` between the tiles of a
row and `<|tile_y_separator|>` after each row, then `<|image|>`, the global view's run, `<|image_end|>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def tile_grids(max_tiles: int) -> list[tuple[int, int]]:
    """(rows, cols) grids of at most `max_tiles` tiles, grouped by aspect ratio in the order each
    ratio first appears going from `max_tiles` tiles down to 1 (transformers' order: it breaks ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def best_grid(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """The tile grid of an image of that size (step 1 above; scales compared in float32, as there)."""
    grids = torch.tensor(tile_grids(max_tiles)) * tile
    scales = torch.minimum(grids[:, 0] / height, grids[:, 1] / width)
    up = scales[scales >= 1]
    chosen = up.min() if len(up) else scales[scales < 1].max()
    candidates = grids[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]) // tile, int(best[1]) // tile


def fitted_size(height: int, width: int, box_height: int, box_width: int) -> tuple[int, int]:
    """The largest size of the image's aspect within the box (each side at least 1)."""
    scale_w, scale_h = box_width / width, box_height / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), box_height), 1), max(box_width, 1)
    return max(box_height, 1), max(min(math.floor(width * scale_h), box_width), 1)


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, height, width], bilinear with antialiasing."""
    return F.interpolate(pixels[None], size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    half = torch.full((3, 1, 1), 0.5, dtype=torch.bfloat16)
    return (pixels.to(torch.bfloat16) * (1 / 255)).sub_(half).div_(half)


@dataclass(frozen=True)
class Llama4Pixels:
    tiles: torch.Tensor           # bfloat16 [tiles (+ the global view), 3, tile, tile]
    grid: tuple[int, int]         # (rows, cols) of the canvas


class Llama4ImageProcessor:
    def __init__(self, tile: int = 336, max_patches: int = 16, patch: int = 14, shuffle_ratio: float = 0.5) -> None:
        self.tile, self.max_patches = tile, max_patches
        self.tokens_per_tile = int((tile // patch) ** 2 * shuffle_ratio ** 2)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return best_grid(height, width, self.tile, self.max_patches)

    def preprocess(self, image: Image.Image) -> Llama4Pixels:
        rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        h, w = rgb.shape[1:]
        rows, cols = self.grid(h, w)
        canvas_h, canvas_w = rows * self.tile, cols * self.tile
        new_h, new_w = fitted_size(h, w, min(max(h, self.tile), canvas_h), min(max(w, self.tile), canvas_w))
        canvas = F.pad(_resize(rgb, new_h, new_w), (0, canvas_w - new_w, 0, canvas_h - new_h))
        values = _normalize(canvas)
        tiles = values.view(3, rows, self.tile, cols, self.tile).permute(1, 3, 0, 2, 4).reshape(-1, 3, self.tile,
                                                                                                  self.tile)
        if rows * cols > 1:
            tiles = torch.cat([tiles, _normalize(_resize(rgb, self.tile, self.tile))[None]])
        return Llama4Pixels(tiles, (rows, cols))

    def prompt_tokens(self, grid: tuple[int, int]) -> list[str]:
        """The image's tokens in the prompt, as token strings."""
        rows, cols = grid
        run = ["<|patch|>"] * self.tokens_per_tile
        out = ["<|image_start|>"]
        if rows * cols > 1:
            for _ in range(rows):
                for col in range(cols):
                    out += run + (["<|tile_x_separator|>"] if col < cols - 1 else [])
                out.append("<|tile_y_separator|>")
        return out + ["<|image|>", *run, "<|image_end|>"]
