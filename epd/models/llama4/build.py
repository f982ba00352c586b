"""Llama 4's modules on a device with the checkpoint's weights: the text model (q_proj / k_proj rows
of RoPE layers reordered for the engine's half rotation), the vision encoder, and transformers'
vision path (the reference GPU tests compare against)."""

from __future__ import annotations

from typing import Any

import torch

from epd.layers.rotary import RotaryEmbedding
from epd.models.llama4.attention_math import deinterleave_rope_rows
from epd.models.llama4.text_model import Llama4LM
from epd.models.llama4.vision import Llama4Vision
from epd.models.weights import load_into


def build_lm(family: Any, device: torch.device, dtype: torch.dtype) -> Llama4LM:
    spec = family.spec
    with torch.device("meta"):
        model = Llama4LM(spec, torch.nn.Identity())
    model = model.to_empty(device=device).to(dtype)
    model.rotary = RotaryEmbedding(spec.inv_freq()).to(device)
    rope_layers = {i for i, kind in enumerate(spec.layers) if kind.uses_rope}

    def text_weights():
        for name, tensor in family.weights(""):
            if name.startswith("vision."):
                continue
            parts = name.split(".")
            if len(parts) > 4 and parts[1] == "layers" and int(parts[2]) in rope_layers \
                    and parts[4] in ("q_proj", "k_proj"):
                tensor = deinterleave_rope_rows(tensor, spec.head_dim)
            yield name, tensor

    load_into(model, text_weights())
    return model.eval()


class VisionEncoder:
    """Tiles -> `<|patch|>` rows: one forward over every tile of the images given."""

    def __init__(self, family: Any, device: torch.device | str, dtype: torch.dtype) -> None:
        self.device, self.dtype, self.family = torch.device(device), dtype, family
        with torch.device("meta"):
            module = Llama4Vision(family.hf)
        module = module.to_empty(device=self.device).to(dtype)
        load_into(module, family.weights("vision."), strip="vision.")
        module.vision_model.rope = _rope(family.hf, self.device)   # made on the meta device: made again here
        self.module = module.eval()

    @torch.inference_mode()
    def encode(self, images: list[Any]) -> list[torch.Tensor]:
        if not images:
            return []
        tiles = torch.cat([im.pixels.tiles for im in images]).to(self.device, self.dtype)
        rows = self.module(tiles)
        return list(rows.split([self.family.embedding_rows(im.layout) for im in images]))


def _rope(hf: Any, device: torch.device) -> torch.Tensor:
    from epd.models.llama4.vision import rope_table

    return rope_table(hf.vision_config).to(device)


class TransformersVision:
    """transformers' own `get_image_features` (its model loaded whole, the text model then freed)."""

    def __init__(self, family: Any, device: torch.device | str, dtype: torch.dtype) -> None:
        from transformers import Llama4ForConditionalGeneration

        model = Llama4ForConditionalGeneration.from_pretrained(family.path, dtype=dtype)
        del model.language_model
        self.model = model.to(device).eval()
        self.device, self.dtype, self.family = torch.device(device), dtype, family

    @torch.inference_mode()
    def encode(self, images: list[Any]) -> list[torch.Tensor]:
        tiles = torch.cat([im.pixels.tiles for im in images]).to(self.device, self.dtype)
        rows = self.model.get_image_features(pixel_values=tiles).pooler_output.flatten(0, 1)
        return list(rows.split([self.family.embedding_rows(im.layout) for im in images]))
