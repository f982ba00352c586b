"""Llama 4's image processor (torch ops, no torchvision) on the CPU: tile grids, canvas choice, the
tiles and the global view, the prompt's token layout. Its equality with transformers'
torchvision-based `Llama4ImageProcessor` is checked on the GPU host (tests/gpu/test_llama4_processor.py),
which has torchvision."""

from __future__ import annotations

import torch
from PIL import Image
from support import noise_image

from epd.models.llama4.image_processor import Llama4ImageProcessor, best_grid, tile_grids


def test_grids_cover_every_tiling_up_to_the_maximum_once():
    grids = tile_grids(16)
    assert len(grids) == len(set(grids)) and all(r * c <= 16 for r, c in grids)
    assert {(r, c) for r in range(1, 17) for c in range(1, 17) if r * c <= 16} == set(grids)
    assert grids[:4] == [(1, 16), (2, 8), (1, 4), (4, 4)]   # grouped by ratio, ratios as 16, 15, ... tiles bring them


def test_canvas_upscales_least_and_downscales_least():
    assert best_grid(336, 336, 336, 16) == (1, 1)
    assert best_grid(200, 300, 336, 16) == (1, 1)        # fits one tile: scale 1.12, the least upscaling
    assert best_grid(720, 1280, 336, 16) == (3, 4)       # 4:3 tiles for a 16:9 photo, no downscaling
    assert best_grid(10000, 100, 336, 16) == (16, 1)     # too tall for any grid: the least downscaling


def test_tiles_then_a_global_view_in_bfloat16():
    proc = Llama4ImageProcessor(tile=56, max_patches=16, patch=14)
    pixels = proc.preprocess(noise_image(130, 60, seed=3))
    rows, cols = pixels.grid
    assert rows * cols > 1 and pixels.tiles.shape == (rows * cols + 1, 3, 56, 56)
    assert pixels.tiles.dtype == torch.bfloat16 and pixels.tiles.min() >= -1 and pixels.tiles.max() <= 1
    black = proc.preprocess(Image.new("RGB", (56, 56)))
    assert black.grid == (1, 1) and black.tiles.shape == (1, 3, 56, 56) and (black.tiles == -1).all()


def test_the_image_is_padded_with_black_at_the_bottom_right():
    proc = Llama4ImageProcessor(tile=56, max_patches=4, patch=14)
    pixels = proc.preprocess(Image.new("RGB", (112, 40), (255, 255, 255)))   # fits 1 x 2 tiles, 40 of 56 rows
    assert pixels.grid == (1, 2)
    first = pixels.tiles[0]
    assert (first[:, :40] == 1).all() and (first[:, 40:] == -1).all()


def test_prompt_layout_of_a_tiled_image():
    proc = Llama4ImageProcessor(tile=56, max_patches=16, patch=14)
    tokens = proc.prompt_tokens((2, 2))
    assert tokens.count("<|patch|>") == 5 * 4 and tokens.count("<|tile_x_separator|>") == 2
    assert tokens.count("<|tile_y_separator|>") == 2 and tokens[0] == "<|image_start|>"
    assert tokens[-6:] == ["<|image|>", *["<|patch|>"] * 4, "<|image_end|>"]
    assert proc.prompt_tokens((1, 1)) == ["<|image_start|>", "<|image|>", *["<|patch|>"] * 4, "<|image_end|>"]
