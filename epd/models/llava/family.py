"""LLaVA-1.5, LLaVA-NeXT (1.6) and LLaVA-OneVision: a CLIP / SigLIP tower, an MLP projector and a
Llama, Mistral or Qwen2 text model (1-D RoPE; q/k/v bias for Qwen2).

An image is one `<image>` placeholder, expanded to one token per projected feature: LLaVA-1.5 a
fixed count per image (576 at 336 px); NeXT and OneVision ("anyres", `anyres`) a count that
depends on the image's size, which the layout's dims carry ((height, width)). Positions are 1-D,
so the decode state is empty. Checkpoint names come as on the Hub (`language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`) or as transformers 5
saves them (`model.language_model.*`, `model.vision_tower.*`, ...).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from epd.config import eos_ids, text_config
from epd.models.family import ImageLayout, ModelFamily
from epd.models.llava.anyres import Anyres

log = logging.getLogger(__name__)
TEXT_MODELS = ("llama", "mistral", "qwen2")
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "image_newline")


class LlavaFamily(ModelFamily):
    def __init__(self, path: str, raw: dict[str, Any], hf: Any) -> None:
        super().__init__(path, raw, hf)
        self.model_type = raw["model_type"]
        tc, vc = hf.text_config, hf.vision_config
        if tc.model_type not in TEXT_MODELS:
            raise ValueError(f"{self.model_type} with a {tc.model_type!r} text model is not supported "
                             f"(supported: {', '.join(TEXT_MODELS)})")
        if getattr(tc, "attention_bias", False) or getattr(tc, "mlp_bias", False):
            raise ValueError("a Llama text model with attention_bias or mlp_bias is not supported")
        self.text = text_config(tc, raw, qkv_bias=tc.model_type == "qwen2")
        window = getattr(tc, "sliding_window", None)
        if window and window < self.text.max_position_embeddings:   # within it attention is full
            log.info("context capped at the sliding window, %d tokens", window)
            self.text = dataclasses.replace(self.text, max_position_embeddings=window)
        self.image_token_id = hf.image_token_id
        self.eos_token_ids = eos_ids(path, tc)
        side = vc.image_size // vc.patch_size
        has_cls = vc.model_type == "clip_vision_model"
        self.base_tokens = side * side + (1 if has_cls and hf.vision_feature_select_strategy == "full" else 0)
        self.anyres: Anyres | None = None
        if self.model_type != "llava":
            aspect = getattr(hf, "vision_aspect_ratio", None)
            self.anyres = Anyres(tuple(tuple(p) for p in hf.image_grid_pinpoints), vc.image_size, side,
                                 int(aspect.removeprefix("anyres_max_")) if aspect else None)

    # ---- images ---------------------------------------------------------------------------------
    def layout_for(self, height: int, width: int, count: int = 1) -> ImageLayout:
        """The layout of an image of that size in a request of `count` images (the one
        image-token formula of this family). OneVision shows each image of a request with several
        as its base view alone (+ newline), as transformers' processor and model do: dims
        (height, width, 0); else anyres: (height, width)."""
        if self.anyres is None:
            return ImageLayout(self.base_tokens)
        if count > 1 and self.model_type == "llava_onevision":
            return ImageLayout(self.base_tokens + 1, (height, width, 0))
        return ImageLayout(self.anyres.token_count(height, width, self.base_tokens), (height, width))

    @staticmethod
    def base_only(layout: ImageLayout) -> bool:
        return len(layout.dims) == 3

    def crops_for(self, layout: ImageLayout) -> int:
        """Crops the vision tower runs for an image of this layout (the base view first)."""
        if self.anyres is None or self.base_only(layout):
            return 1
        rows, cols = self.anyres.grid(*layout.dims)
        return 1 + rows * cols

    def check_layout(self, layout: ImageLayout) -> None:
        super().check_layout(layout)
        dims = layout.dims
        if self.anyres is None:
            ok = dims == () and layout.num_tokens == self.base_tokens
        else:
            ok = len(dims) in (2, 3) and min(dims[:2]) > 0 and dims[2:] in ((), (0,)) and \
                layout == self.layout_for(dims[0], dims[1], 2 if len(dims) == 3 else 1)
        if not ok:
            raise ValueError(f"image layout {layout.to_wire()} is not one a {self.model_type} image has")

    # ---- models ---------------------------------------------------------------------------------
    def build_lm(self, device: torch.device, dtype: torch.dtype):
        from epd.layers.rotary import RotaryEmbedding, rope_inv_freq
        from epd.models.loader import load_decoder_lm

        inv_freq, scaling = rope_inv_freq(self.hf.text_config)
        return load_decoder_lm(self, lambda: RotaryEmbedding(inv_freq, scaling), device, dtype)

    def build_vision(self, device: torch.device | str, dtype: torch.dtype):
        from epd.models.llava.vision import VisionEncoder

        return VisionEncoder(self, device, dtype)

    def reference_vision(self, device: torch.device | str, dtype: torch.dtype):
        from epd.models.llava.vision import TransformersVision

        return TransformersVision(self, device, dtype)

    def image_processor(self, on_device: bool = False):
        from epd.models.llava.image_processor import LlavaImageProcessor

        return LlavaImageProcessor(self)

    def weight_name(self, raw: str) -> str | None:
        name = raw[len("model."):] if raw.startswith("model.") else raw
        if name.startswith("vision_tower.vision_model."):       # the Hub's; transformers 5 drops the level
            return "vision.vision_tower." + name[len("vision_tower.vision_model."):]
        if name.startswith(_VISION_PREFIXES):
            return "vision." + name
        if name == "language_model.lm_head.weight" or name == "lm_head.weight":
            return "lm_head.weight"
        if name.startswith("language_model.model."):
            return "language_model." + name[len("language_model.model."):]
        if name.startswith("language_model."):
            return name
        return None
