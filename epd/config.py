"""Model configuration, read once from a Hugging Face checkpoint directory.

`ModelConfig.from_pretrained(path)` reads `config.json`, finds the checkpoint's family in the
registry (`epd.models`) and lets it parse the config (+ `generation_config.json`) into frozen
dataclasses; everything downstream (KV pool, scheduler, runner) reads these, never the raw HF
config, and asks `ModelConfig.family` for what differs between families.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class TextConfig:
    """The language model's shape, whatever the family (each family's `text_config` fills it)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    embed_vocab_size: int = 0    # rows of the input embedding when more than vocab_size (0: vocab_size)

    @property
    def prompt_vocab_size(self) -> int:
        """Token ids a prompt may hold (the logits cover `vocab_size`)."""
        return self.embed_vocab_size or self.vocab_size


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint as the engine sees it; `family` (epd.models.family.ModelFamily) answers every
    family-specific question (models, image processor, prompt expansion, positions)."""
    model_path: str
    model_type: str
    text: TextConfig
    image_token_id: int
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    family: Any = field(repr=False, compare=False, default=None)

    @property
    def model_id(self) -> str:
        return os.path.basename(os.path.normpath(self.model_path))

    @classmethod
    def from_pretrained(cls, path: str) -> ModelConfig:
        """The checkpoint's config, read once per process (the router's front and its backend, or
        several engines in one test process, share it)."""
        return _model_config(os.path.abspath(path))

    @classmethod
    def read(cls, path: str) -> ModelConfig:
        from transformers import AutoConfig

        from epd.models import family_class

        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"no config.json in model directory {path!r}")
        with open(cfg_file) as f:
            raw = json.load(f)
        model_type = raw.get("model_type")
        family = family_class(model_type)(os.path.abspath(path), raw, AutoConfig.from_pretrained(path))
        return cls(
            model_path=os.path.abspath(path),
            model_type=model_type,
            text=family.text,
            image_token_id=family.image_token_id,
            eos_token_ids=family.eos_token_ids,
            dtype=parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            family=family,
        )


@functools.lru_cache(maxsize=8)
def _model_config(path: str) -> ModelConfig:
    return ModelConfig.read(path)


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer, loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def text_config(tc: Any, raw: dict, qkv_bias: bool) -> TextConfig:
    """TextConfig from a transformers text config (Llama / Mistral / Qwen2 style attributes)."""
    rope = tc.rope_parameters or {}
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {tc.hidden_act!r} is not supported (silu is)")
    tie = bool(raw.get("tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
    return TextConfig(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_layers=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads,
        num_kv_heads=tc.num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=tc.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_position_embeddings=tc.max_position_embeddings,
        tie_word_embeddings=tie,
        qkv_bias=qkv_bias,
    )


def eos_ids(path: str, tc: Any) -> tuple[int, ...]:
    """EOS ids from generation_config.json when present (what `generate` stops on), else config."""
    gen_file = os.path.join(path, "generation_config.json")
    eos: Any = None
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = tc.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def generation_defaults(source: str, model_path: str) -> dict[str, Any]:
    """Sampling defaults for requests that do not set them, as vLLM's --generation-config takes them:
    "auto" from the checkpoint's generation_config.json, a directory from its own, "vllm" none."""
    if source == "vllm":
        return {}
    path = os.path.join(model_path if source == "auto" else source, "generation_config.json")
    if not os.path.isfile(path):
        if source != "auto":
            raise ValueError(f"--generation-config {source!r}: no generation_config.json there")
        return {}
    with open(path) as f:
        raw = json.load(f)
    return {k: raw[k] for k in GENERATION_DEFAULTS if raw.get(k) is not None}
