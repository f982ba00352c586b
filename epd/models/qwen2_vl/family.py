"""Qwen2-VL / Qwen2.5-VL: M-RoPE text model (q/k/v bias), the checkpoint's own vision tower.

An image is a (t, h, w) grid of 14-px patches; every merge x merge patches become one prompt
token (`<|image_pad|>`), so an image of that grid takes t*h*w / merge**2 tokens and its layout's
dims are the grid. Positions are three rows (M-RoPE, `mrope`); the decode state's position
offset is M-RoPE's delta. Checkpoint names come in two schemes, the Hub's (`visual.*`,
`model.layers.*`) and transformers 5's (`model.visual.*`, `model.language_model.layers.*`).
"""

from __future__ import annotations

from typing import Any

import torch

from epd.config import eos_ids, text_config
from epd.errors import InputError
from epd.models.family import DecodeState, ImageLayout, ModelFamily
from epd.models.qwen2_vl.mrope import MRotaryEmbedding, mrope_positions


class QwenVLFamily(ModelFamily):
    position_rows = 3

    def __init__(self, path: str, raw: dict[str, Any], hf: Any) -> None:
        super().__init__(path, raw, hf)
        self.model_type = raw["model_type"]
        self.text = text_config(hf.text_config, raw, qkv_bias=True)
        rope = hf.text_config.rope_parameters or {}
        self.mrope_section = tuple(rope.get("mrope_section") or (16, 24, 24))
        if sum(self.mrope_section) * 2 != self.text.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} does not cover head_dim {self.text.head_dim}")
        self.image_token_id = hf.image_token_id
        self.merge = hf.vision_config.spatial_merge_size
        self.eos_token_ids = eos_ids(path, hf.text_config)

    def build_lm(self, device: torch.device, dtype: torch.dtype):
        from epd.models.loader import load_decoder_lm

        tc = self.text
        return load_decoder_lm(self, lambda: MRotaryEmbedding(tc.head_dim, tc.rope_theta, self.mrope_section),
                               device, dtype, position_rows=3)

    def build_vision(self, device: torch.device | str, dtype: torch.dtype):
        from epd.models.qwen2_vl.vision import VisionTower

        return VisionTower(self, device, dtype)

    def reference_vision(self, device: torch.device | str, dtype: torch.dtype):
        from epd.models.qwen2_vl.vision import VisionTower

        return VisionTower(self, device, dtype, attention="sdpa")

    def image_processor(self, on_device: bool = False):
        from epd.models.qwen2_vl.image_processor import ImageProcessor

        return ImageProcessor(self.path, self.merge, on_device)

    def weight_name(self, raw: str) -> str | None:
        if raw.startswith("model.visual."):
            return "vision." + raw[len("model.visual."):]
        if raw.startswith("visual."):
            return "vision." + raw[len("visual."):]
        if raw.startswith("lm_head."):
            return raw
        if raw.startswith("model.language_model."):
            return "language_model." + raw[len("model.language_model."):]
        if raw.startswith("model."):
            return "language_model." + raw[len("model."):]
        return None

    def positions(self, ids: list[int], layouts: list[ImageLayout]) -> tuple[torch.Tensor, DecodeState]:
        positions, offset = mrope_positions(ids, self.image_token_id, [lay.dims for lay in layouts], self.merge)
        return positions, DecodeState(offset)

    def precomputed_layout(self, item: dict[str, Any], embeddings: torch.Tensor, index: int,
                           ids: list[int] | None = None) -> ImageLayout:
        where = f"image_data[{index}]"
        thw = item.get("image_grid_thw")
        if thw is None:
            raise InputError(f"image {index}: a precomputed item needs 'precomputed_embeddings' and "
                             f"'image_grid_thw'", where)
        grid = tuple(int(x) for x in torch.as_tensor(thw).reshape(-1).tolist())
        if len(grid) != 3:
            raise InputError(f"image {index}: image_grid_thw must be (t, h, w), got {grid}", where)
        tokens = grid[0] * grid[1] * grid[2] // self.merge**2
        if embeddings.dim() != 2 or embeddings.shape != (tokens, self.text.hidden_size):
            raise InputError(f"image {index}: precomputed_embeddings has shape {tuple(embeddings.shape)}, expected "
                             f"({tokens}, {self.text.hidden_size}) for grid {grid}", where)
        return ImageLayout(tokens, grid)

    def check_layout(self, layout: ImageLayout) -> None:
        super().check_layout(layout)
        dims = layout.dims
        if len(dims) != 3 or dims[1] % self.merge or dims[2] % self.merge or \
                dims[0] * dims[1] * dims[2] // self.merge**2 != layout.num_tokens:
            raise ValueError(f"image layout {layout.to_wire()} is not a (tokens, t, h, w) patch grid")
