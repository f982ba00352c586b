"""Llama 4 (`llama4`, Llama-4-Scout): a tiled ViT with pixel shuffle whose projected patches replace
`<|patch|>` tokens of a text model with mixture-of-experts feed-forward layers and interleaved
chunked-RoPE / full-NoPE attention layers. Not registered yet: its paged-KV language model is
still to come; so far the config reader (`text_config`), the grouped MoE (`moe`), the plain-torch
reference of the text model (`attention_math`) and random checkpoints (`tiny`)."""

from epd.models.llama4.tiny import PRESETS, text_dims, write_tiny

__all__ = ["PRESETS", "text_dims", "write_tiny"]
