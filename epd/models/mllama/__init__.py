"""Llama-3.2-Vision (`mllama`): a tiled ViT (local + gated global layers) whose projected output
the Llama 3 text model reads through gated cross-attention layers."""

from epd.models.mllama.family import MllamaFamily as FAMILY
from epd.models.mllama.tiny import PRESETS, text_dims, write_tiny

__all__ = ["FAMILY", "PRESETS", "text_dims", "write_tiny"]
