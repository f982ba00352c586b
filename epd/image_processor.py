"""Image preprocessing for the Qwen2-VL family with the slow (PIL/numpy) processor.

`ImageProcessor.preprocess(img)` resizes to multiples of patch*merge within the checkpoint's
min/max pixel bounds and returns the flattened patches plus the (t, h, w) patch grid; the number
of LM tokens the image becomes is t*h*w / merge**2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class PreprocessedImage:
    pixel_values: torch.Tensor          # [t*h*w, C*temporal*patch*patch]
    grid_thw: tuple[int, int, int]
    num_tokens: int


class ImageProcessor:
    def __init__(self, model_path: str, merge_size: int) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self._proc = Qwen2VLImageProcessorPil.from_pretrained(model_path)
        self.merge = merge_size

    def grid_for(self, image: Image.Image) -> tuple[int, int, int]:
        """The (t, h, w) patch grid `preprocess` would produce, from the size alone (cheap)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        p = self._proc
        factor = p.patch_size * p.merge_size
        h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=p.size.shortest_edge,
                            max_pixels=p.size.longest_edge)
        return 1, h // p.patch_size, w // p.patch_size

    def preprocess(self, image: Image.Image) -> PreprocessedImage:
        out = self._proc(images=[image], return_tensors="pt")
        t, h, w = (int(x) for x in out["image_grid_thw"][0].tolist())
        return PreprocessedImage(out["pixel_values"], (t, h, w), t * h * w // self.merge**2)
