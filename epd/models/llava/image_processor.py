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

    def layout(self, image: Image.Image) -> ImageLayout:
        return self.family.layout_for(image.height, image.width)

    def preprocess(self, image: Image.Image) -> LlavaPixels:
        out = self._proc(images=[image], return_tensors="pt")
        pixels = out["pixel_values"][0]
        if pixels.dim() == 3:                 # LLaVA-1.5: one crop
            pixels = pixels[None]
        layout = self.layout(image)
        want = self.family.crops_for(image.height, image.width)
        if pixels.shape[0] != want:
            raise ValueError(f"the image processor made {pixels.shape[0]} crops, {want} expected")
        return LlavaPixels(layout, pixels, (image.height, image.width))

    def preprocess_many(self, images: list[Image.Image]) -> list[LlavaPixels]:
        return preprocess_on_threads(self.preprocess, images)
