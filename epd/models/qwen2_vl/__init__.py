"""Qwen2-VL and Qwen2.5-VL (`qwen2_vl`, `qwen2_5_vl`)."""

from epd.models.qwen2_vl.family import QwenVLFamily as FAMILY
from epd.models.qwen2_vl.tiny import PRESETS, text_dims, write_tiny

__all__ = ["FAMILY", "PRESETS", "text_dims", "write_tiny"]
