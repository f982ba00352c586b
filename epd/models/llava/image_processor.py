"""LLaVA image preprocessing: transformers' PIL / numpy processors of the checkpoint, per image.

`LlavaImageProcessor.preprocess` runs the checkpoint's own processor (`LlavaImageProcessorPil`,
`LlavaNextImageProcessorPil`, `LlavaOnevisionImageProcessorPil`: no torchvision), so the pixel
values are transformers' bit for bit, and checks that the crops it made are the ones the layout
(`LlavaFamily.layout_for`, from the size alone) counted. Several images run on a few threads (PIL's
resize lets go of the GIL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from epd.media.loading import content_hash
from epd.models.family import ImageLayout, preprocess_on_threads

_PROCESSORS = {
    "llava": ("transformers.models.llava.image_processing_pil_llava", "LlavaImageProcessorPil"),
    "llava_next": ("transformers.models.llava_next.image_processing_pil_llava_next", "LlavaNextImageProcessorPil"),
    "llava_onevision": ("transformers.models.llava_onevision.image_processing_pil_llava_onevision",
                        "LlavaOnevisionImageProcessorPil"),
}


_COMPANION = Image.new("RGB", (2, 2))


@dataclass
class LlavaPixels:
    layout: ImageLayout
    pixel_values: torch.Tensor      # float32 [crops, C, S, S]: the base view first (anyres), then the tiles
    size: tuple[int, int]           # the image's (height, width)

    @property
    def num_crops(self) -> int:
        return self.pixel_values.shape[0]

    def content_key(self) -> str:
        data = self.pixel_values.contiguous()
        return content_hash(f"llava:{self.layout.to_wire()}:{tuple(data.shape)}:", data.numpy())


class LlavaImageProcessor:
    def __init__(self, family: Any) -> None:
        import importlib

        module, name = _PROCESSORS[family.model_type]
        self._proc = getattr(importlib.import_module(module), name).from_pretrained(family.path)
        self.family = family

    def layout(self, image: Image.Image, count: int = 1) -> ImageLayout:
        return self.family.layout_for(image.height, image.width, count)

    def preprocess(self, image: Image.Image, layout: ImageLayout | None = None) -> LlavaPixels:
        layout = layout or self.layout(image)
        self.family.check_layout(layout)
        if self.family.anyres is not None and layout.dims[:2] != (image.height, image.width):
            raise ValueError(f"image layout {layout.to_wire()} is not for a {image.width}x{image.height} image")
        # the processor lays out an image of a prompt with several (OneVision: a padded square
        # base view, no crops) when it is handed in as one of several: a 2 x 2 companion does that
        one_prompt = [[image, _COMPANION]] if self.family.base_only(layout) else [image]
        pixels = self._proc(images=one_prompt, return_tensors="pt")["pixel_values"][0]
        if pixels.dim() == 3:                 # LLaVA-1.5: one crop
            pixels = pixels[None]
        want = self.family.crops_for(layout)
        if pixels.shape[0] < want or (pixels.shape[0] > want and not self.family.base_only(layout)):
            raise ValueError(f"the image processor made {pixels.shape[0]} crops, {want} expected")
        return LlavaPixels(layout, pixels[:want], (image.height, image.width))

    def preprocess_many(self, images: list[Image.Image], layouts: list[ImageLayout] | None = None) -> list[LlavaPixels]:
        todo = list(zip(images, layouts or [None] * len(images), strict=True))
        return preprocess_on_threads(lambda item: self.preprocess(*item), todo)
