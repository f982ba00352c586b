"""Build the language model and vision tower of a checkpoint on a device, weights loaded."""

from __future__ import annotations

import torch

from epd.config import ModelConfig
from epd.models.qwen2_vl_text import MRotaryEmbedding, Qwen2VLLanguageModel
from epd.models.weights import iter_weights, load_into


def load_language_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Qwen2VLLanguageModel:
    with torch.device("meta"):
        model = Qwen2VLLanguageModel(config.text)
    model = model.to_empty(device=device).to(dtype)
    tc = config.text
    model.rotary = MRotaryEmbedding(tc.head_dim, tc.rope_theta, tc.mrope_section).to(device)
    if tc.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight

    def text_weights():
        for name, t in iter_weights(config.model_path):
            if name.startswith("language_model.") or name.startswith("lm_head."):
                if name == "lm_head.weight" and tc.tie_word_embeddings:
                    continue
                yield name, t

    load_into(model, text_weights())
    return model.eval()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
