"""Llama 4 (`llama4`) on the model seam: early fusion, an image's rows interleaved with structure
tokens.

An image is one `<|image|>` in a rendered prompt; `expand` replaces it with its block
(`image_processor.Llama4ImageProcessor.prompt_tokens`): `<|image_start|>`, the tiles' `<|patch|>`
runs between tile separators, `<|image|>`, the global view's run, `<|image_end|>`. The layout is
(tokens of the block, dims (rows, cols) of its tile grid); the vision encoder's rows replace the
block's `<|patch|>` tokens in order (`embedding_offsets`). Positions are 1-D; the text model is
`text_model.Llama4LM`; checkpoint names as on the Hub (`language_model.model.*`, `vision_model.*`,
`multi_modal_projector.*`) or as transformers 5 saves them (`model.language_model.*`, ...).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from epd.config import eos_ids
from epd.errors import InputError
from epd.models.family import ImageLayout, ModelFamily, preprocess_on_threads, replace_placeholders
from epd.models.llama4.image_processor import Llama4ImageProcessor, Llama4Pixels
from epd.models.llama4.text_config import Llama4TextSpec
from epd.models.llama4.tokenizer import NUM_SPECIAL, OFFSETS
from epd.models.weights import vlm_weight_name

_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclass(frozen=True)
class Llama4Image:
    """A preprocessed image: its layout and its tiles (the global view last)."""
    layout: ImageLayout
    pixels: Llama4Pixels

    def content_key(self) -> str:
        return hashlib.blake2b(self.pixels.tiles.view(torch.int16).numpy().tobytes(), digest_size=16).hexdigest()


class ImageProcessor:
    def __init__(self, family: Llama4Family) -> None:
        self.family, self.inner = family, family.processor

    def layout(self, image: Image.Image, count: int = 1) -> ImageLayout:
        return self.family.layout_for(self.inner.grid(image.height, image.width))

    def preprocess_many(self, images: list[Image.Image], layouts: list[ImageLayout] | None = None) -> list[Llama4Image]:
        pixels = preprocess_on_threads(self.inner.preprocess, images)
        return [Llama4Image(self.family.layout_for(p.grid), p) for p in pixels]


class Llama4Family(ModelFamily):
    def __init__(self, path: str, raw: dict[str, Any], hf: Any) -> None:
        super().__init__(path, raw, hf)
        self.spec = Llama4TextSpec.from_dict(raw["text_config"])
        self.text = self.spec.text_config()
        base = self.spec.vocab_size - NUM_SPECIAL
        self.token = {name: base + offset for name, offset in OFFSETS.items()}
        self.image_token_id = hf.image_token_index
        if self.image_token_id != self.token["<|patch|>"]:
            raise ValueError(f"image_token_index {self.image_token_id} is not <|patch|> ({self.token['<|patch|>']})")
        self.eos_token_ids = eos_ids(path, hf.text_config)
        vc = hf.vision_config
        self.processor = Llama4ImageProcessor(vc.image_size, _max_patches(path), vc.patch_size, vc.pixel_shuffle_ratio)

    # ---- models ---------------------------------------------------------------------------------
    def build_lm(self, device: torch.device, dtype: torch.dtype):
        from epd.models.llama4.build import build_lm

        return build_lm(self, device, dtype)

    def build_vision(self, device: torch.device | str, dtype: torch.dtype):
        from epd.models.llama4.build import VisionEncoder

        return VisionEncoder(self, device, dtype)

    def reference_vision(self, device: torch.device | str, dtype: torch.dtype):
        from epd.models.llama4.build import TransformersVision

        return TransformersVision(self, device, dtype)

    def image_processor(self, on_device: bool = False) -> ImageProcessor:
        return ImageProcessor(self)

    def weight_name(self, raw: str) -> str | None:
        return vlm_weight_name(raw, _VISION_PREFIXES)

    # ---- images ---------------------------------------------------------------------------------
    def block(self, grid: tuple[int, int]) -> list[int]:
        """An image's token ids in the prompt."""
        return [self.token[t] for t in self.processor.prompt_tokens(grid)]

    def layout_for(self, grid: tuple[int, int]) -> ImageLayout:
        return ImageLayout(len(self.block(grid)), tuple(grid))

    def check_layout(self, layout: ImageLayout) -> None:
        dims = layout.dims
        if len(dims) != 2 or min(dims) < 1 or dims[0] * dims[1] > self.processor.max_patches \
                or layout != self.layout_for(dims):
            raise ValueError(f"image layout {layout.to_wire()} is not one a Llama 4 image has")

    def embedding_rows(self, layout: ImageLayout) -> int:
        rows, cols = layout.dims
        return self.processor.tokens_per_tile * (rows * cols + (1 if rows * cols > 1 else 0))

    def embedding_offsets(self, layout: ImageLayout) -> list[int] | None:
        return [i for i, t in enumerate(self.block(layout.dims)) if t == self.image_token_id]

    def precomputed_layout(self, item: dict[str, Any], embeddings: torch.Tensor, index: int,
                           ids: list[int] | None = None) -> ImageLayout:
        """SGLang's precomputed item (the projector's rows of every tile, no grid): the grid is read
        from the image's block in an expanded prompt (the processor's), or is one tile."""
        where = f"image_data[{index}]"
        if embeddings.dim() != 2 or embeddings.shape[1] != self.text.hidden_size:
            raise InputError(f"image {index}: precomputed_embeddings has shape {tuple(embeddings.shape)}, expected "
                             f"(rows, {self.text.hidden_size})", where)
        grid = self._grid_in_prompt(ids or [], index)
        if grid is None and embeddings.shape[0] != self.processor.tokens_per_tile:
            raise InputError(f"image {index}: {embeddings.shape[0]} rows are several tiles: give the expanded "
                             "input_ids (the processor's), whose image block says how they are laid out", where)
        layout = self.layout_for(grid or (1, 1))
        if self.embedding_rows(layout) != embeddings.shape[0]:
            raise InputError(f"image {index}: {embeddings.shape[0]} rows, its block in the prompt takes "
                             f"{self.embedding_rows(layout)}", where)
        return layout

    def _grid_in_prompt(self, ids: list[int], index: int) -> tuple[int, int] | None:
        starts = [i for i, t in enumerate(ids) if t == self.token["<|image_start|>"]]
        if index >= len(starts):
            return None
        tail = ids[starts[index]:]
        block = tail[:tail.index(self.token["<|image_end|>"])] if self.token["<|image_end|>"] in tail else tail
        rows = block.count(self.token["<|tile_y_separator|>"])
        return (rows, block.count(self.token["<|tile_x_separator|>"]) // rows + 1) if rows else (1, 1)

    def expand(self, ids: list[int], layouts: list[ImageLayout]) -> list[int]:
        """Each `<|image|>` placeholder -> its image's block; a prompt holding blocks already is kept."""
        if self.token["<|image_start|>"] in ids:
            return ids
        return replace_placeholders(ids, self.token["<|image|>"], layouts, lambda layout: self.block(layout.dims))

    def check_expanded(self, ids: list[int], layouts: list[ImageLayout]) -> list[int]:
        starts = [i for i, t in enumerate(ids) if t == self.token["<|image_start|>"]]
        if len(starts) != len(layouts) or any(ids[s:s + lay.num_tokens] != self.block(lay.dims)
                                              for s, lay in zip(starts, layouts, strict=False)):
            raise InputError(f"the prompt's image blocks do not match the {len(layouts)} image(s) given", "input_ids")
        patches = sum(self.embedding_rows(lay) for lay in layouts)
        if ids.count(self.image_token_id) != patches:
            raise InputError("<|patch|> tokens outside the images' blocks", "input_ids")
        return starts


def _max_patches(path: str) -> int:
    import json
    import os

    with open(os.path.join(path, "preprocessor_config.json")) as f:
        return int(json.load(f).get("max_patches", 16))
