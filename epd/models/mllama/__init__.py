"""Llama-3.2-Vision (`mllama`): a tiled ViT (local + gated global layers) whose projected output
the Llama 3 text model reads through gated cross-attention layers. Not registered yet: the text
model with cross-attention is still to come."""

from epd.models.mllama.tiny import PRESETS, text_dims, write_tiny

__all__ = ["PRESETS", "text_dims", "write_tiny"]
