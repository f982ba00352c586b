"""Build a family's language model on a device with its checkpoint's weights loaded."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from epd.layers.decoder import DecoderLM
from epd.models.weights import load_into


def load_decoder_lm(family, rotary: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype,
                    position_rows: int = 1) -> DecoderLM:
    """A `DecoderLM` of `family.text` (built without initialising weights), the rotary made by
    `rotary()` on the device (its tables stay float32), weights from `family.weights`."""
    tc = family.text
    with torch.device("meta"):
        model = DecoderLM(tc, nn.Identity(), position_rows)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = rotary().to(device)
    if tc.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight

    def text_weights():
        for name, tensor in family.weights(""):
            if name.startswith("language_model.") or (name == "lm_head.weight" and not tc.tie_word_embeddings):
                yield name, tensor

    load_into(model, text_weights())
    return model.eval()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_device(device: torch.device) -> torch.device:
    """`device`, made this process's current CUDA device when it names one (`cuda:N`), so that
    kernels, graphs and libraries that use the current device run on it."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device
