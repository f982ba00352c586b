"""Checkpoint tensor names of Llama-3.2-Vision, both ways.

On the Hub: `language_model.model.*`, `language_model.lm_head.weight`, `vision_model.*`,
`multi_modal_projector.*`. transformers 5 saves `model.language_model.*`, `lm_head.weight`,
`model.vision_model.*`, `model.multi_modal_projector.*`. Ours: `language_model.*` and
`lm_head.weight` (the text model), `vision.vision_model.*` and `vision.multi_modal_projector.*`
(`vision.MllamaVision`, whose parameter names below `vision.` are the Hub's).
"""

from __future__ import annotations

from epd.models.weights import vlm_weight_name

_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def hub_name(name: str) -> str:
    """transformers 5 module names -> the names Hub checkpoints use."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    return name[len("model."):] if name.startswith("model.") else name


def weight_name(raw: str) -> str | None:
    """A checkpoint tensor's name in our modules (either naming); None for anything else."""
    return vlm_weight_name(raw, _VISION_PREFIXES)
