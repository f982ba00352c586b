"""Turn a prompt (text or token ids) plus images into what the model consumes.

`InputProcessor.process` tokenizes, loads and preprocesses images (or accepts precomputed
embeddings), expands each image placeholder token to the image's token count, and computes
M-RoPE positions. Mismatches between placeholders and images, and prompts longer than the
context, raise `InputError` naming the problem; nothing is allocated before this succeeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from epd.config import ModelConfig
from epd.image_processor import ImageProcessor, PreprocessedImage
from epd.media.loading import content_hash, image_content_hash, load_image
from epd.mrope import mrope_positions


class InputError(ValueError):
    """A request the engine cannot run as given (the HTTP layer maps it to 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ImageInput:
    grid_thw: tuple[int, int, int]
    num_tokens: int
    pixels: PreprocessedImage | None = None    # when the vision tower must run (here)
    embeddings: torch.Tensor | None = None     # [num_tokens, hidden], once encoded
    content_hash: str | None = None            # the router's: the encoder node's embedding-cache key
    source: Any = None                         # the PIL image, when pixels are left to the encoder
    source_rgb: bytes | None = None            # and its raw RGB bytes (what the encoder is sent)


@dataclass
class ProcessedInput:
    input_ids: list[int]
    images: list[ImageInput]
    positions: torch.Tensor                    # [3, len(input_ids)]
    mrope_delta: int
    image_offsets: list[int] = field(default_factory=list)  # index of each image's first token


class InputProcessor:
    def __init__(self, config: ModelConfig, tokenizer: Any, max_context: int, with_pixels: bool = True,
                 resize_on_device: bool = False, image_keys: bool = True) -> None:
        """with_pixels=False (the router): images get their grid from their size only; the
        encoder node preprocesses the pixels. resize_on_device: see `ImageProcessor`.
        image_keys=False (the router's prompt check, which only counts tokens): such images get no
        raw RGB copy and no content hash (~3 ms a 720p image)."""
        self.with_pixels = with_pixels
        self.image_keys = image_keys
        self.config = config
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.image_processor = ImageProcessor(config.model_path, config.spatial_merge_size, resize_on_device)

    def process(self, prompt: str | None = None, input_ids: list[int] | None = None,
                image_data: list | None = None) -> ProcessedInput:
        if (prompt is None) == (input_ids is None):
            raise InputError("give exactly one of prompt or input_ids", "prompt")
        ids = list(input_ids) if input_ids is not None else self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise InputError("the prompt is empty", "prompt")
        items = list(image_data or [])
        loaded = {i: load_image(item, index=i, allow_any_local=True)
                  for i, item in enumerate(items) if not isinstance(item, dict)}
        pre: dict[int, PreprocessedImage] = {}
        if self.with_pixels:   # several images are preprocessed on a few threads
            pre = dict(zip(loaded, self.image_processor.preprocess_many(list(loaded.values())), strict=True))
        images = [_precomputed(i, item, self.config) if isinstance(item, dict) else self._image(loaded[i], pre.get(i))
                  for i, item in enumerate(items)]
        ids = self._expand(ids, images)
        if len(ids) >= self.max_context:
            raise InputError(f"prompt is {len(ids)} tokens (text + images); the context is {self.max_context} "
                             f"tokens and at least one must be left to generate", "prompt")
        return build_processed(self.config, ids, images)

    def _image(self, image: Image.Image, pre: PreprocessedImage | None) -> ImageInput:
        if pre is None:   # the router: the grid from the size; an encoder node preprocesses the pixels
            grid = self.image_processor.grid_for(image)
            tokens = grid[0] * grid[1] * grid[2] // self.config.spatial_merge_size**2
            if not self.image_keys:
                return ImageInput(grid, tokens, source=image)
            rgb = image.tobytes()
            return ImageInput(grid, tokens, content_hash=image_content_hash(image, rgb), source=image, source_rgb=rgb)
        # encoded here: the key names the image for prefix caching (epd.engine.prefix_cache)
        key = pixels_content_hash(pre) if self.image_keys else None
        return ImageInput(pre.grid_thw, pre.num_tokens, pixels=pre, content_hash=key)

    def _expand(self, ids: list[int], images: list[ImageInput]) -> list[int]:
        """One placeholder per image is expanded; an already expanded prompt is accepted as is."""
        pad = self.config.image_token_id
        count = sum(1 for t in ids if t == pad)
        runs = _runs(ids, pad)
        if len(runs) == len(images) and all(n == im.num_tokens for n, im in zip(runs, images, strict=True)):
            return ids
        if count != len(images):
            raise InputError(f"the prompt has {count} image placeholder(s) but {len(images)} image(s) were given",
                             "image_data")
        out: list[int] = []
        it = iter(images)
        for t in ids:
            out.extend([pad] * next(it).num_tokens if t == pad else [t])
        return out


def outside_vocabulary(ids: Sequence[int], vocab_size: int) -> str | None:
    """Why `ids` cannot be used with this vocabulary (the first id outside it), or None."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    return None if bad is None else f"token id {bad} is outside the vocabulary (size {vocab_size})"


def build_processed(config: ModelConfig, ids: list[int], images: list[ImageInput]) -> ProcessedInput:
    """Validate an expanded prompt against its images and compute M-RoPE positions."""
    why = outside_vocabulary(ids, config.text.vocab_size)
    if why is not None:
        raise InputError(why, "input_ids")
    runs = _runs(ids, config.image_token_id)
    if runs != [im.num_tokens for im in images]:
        raise InputError(f"image placeholder runs {runs} do not match the images' token counts "
                         f"{[im.num_tokens for im in images]}", "input_ids")
    positions, delta = mrope_positions(ids, config.image_token_id, [im.grid_thw for im in images],
                                       config.spatial_merge_size)
    return ProcessedInput(ids, images, positions, delta, _image_starts(ids, images, config.image_token_id))


def _runs(ids: list[int], token: int) -> list[int]:
    runs, n = [], 0
    for t in ids:
        if t == token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    if n:
        runs.append(n)
    return runs


def _image_starts(ids: list[int], images: list[ImageInput], pad: int) -> list[int]:
    starts, i = [], 0
    for im in images:
        while ids[i] != pad:
            i += 1
        starts.append(i)
        i += im.num_tokens
    return starts


def _precomputed(index: int, item: dict, config: ModelConfig) -> ImageInput:
    modality = str(item.get("modality", "IMAGE")).upper()
    if modality != "IMAGE":
        raise InputError(f"image {index}: unsupported modality {modality!r}", f"image_data[{index}]")
    emb, thw = item.get("precomputed_embeddings"), item.get("image_grid_thw")
    if emb is None or thw is None:
        raise InputError(f"image {index}: a precomputed item needs 'precomputed_embeddings' and "
                         f"'image_grid_thw'", f"image_data[{index}]")
    grid = tuple(int(x) for x in torch.as_tensor(thw).reshape(-1).tolist())
    if len(grid) != 3:
        raise InputError(f"image {index}: image_grid_thw must be (t, h, w), got {grid}", f"image_data[{index}]")
    emb = torch.as_tensor(emb)
    tokens = grid[0] * grid[1] * grid[2] // config.spatial_merge_size**2
    if emb.dim() != 2 or emb.shape != (tokens, config.text.hidden_size):
        raise InputError(f"image {index}: precomputed_embeddings has shape {tuple(emb.shape)}, expected "
                         f"({tokens}, {config.text.hidden_size}) for grid {grid}", f"image_data[{index}]")
    return ImageInput(grid, tokens, embeddings=emb)  # type: ignore[arg-type]


def pixels_content_hash(pre: PreprocessedImage) -> str:
    """The preprocessed image's identity (its pixels, grid and pending resize): equal pixels give
    equal vision embeddings, so equal keys (prefix caching)."""
    data = pre.data.contiguous()
    header = f"pixels:{tuple(pre.grid_thw)}:{pre.resize_to}:{tuple(data.shape)}:{data.dtype}:"
    return content_hash(header, data.numpy())
