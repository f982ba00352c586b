"""Llama 4 (`llama4`, Llama-4-Scout): a tiled ViT with pixel shuffle whose projected patches replace
`<|patch|>` tokens of a text model with mixture-of-experts feed-forward layers and interleaved
chunked-RoPE / full-NoPE attention layers."""

from epd.models.llama4.family import Llama4Family as FAMILY
from epd.models.llama4.tiny import PRESETS, text_dims, write_tiny

__all__ = ["FAMILY", "PRESETS", "text_dims", "write_tiny"]
