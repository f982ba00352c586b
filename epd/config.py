"""Model configuration, read once from a Hugging Face checkpoint directory.

`ModelConfig.from_pretrained(path)` parses `config.json` (+ `generation_config.json`) into frozen
dataclasses; everything downstream (model, KV pool, scheduler, processors) reads these, never the
raw HF config. The raw HF config object is kept only to build the vision tower from `transformers`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHS = ("qwen2_vl", "qwen2_5_vl")

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
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class ModelConfig:
    model_path: str
    arch: str
    text: TextConfig
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    spatial_merge_size: int
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    hf_config: Any = field(repr=False, compare=False, default=None)

    @property
    def model_id(self) -> str:
        return os.path.basename(os.path.normpath(self.model_path))

    @classmethod
    def from_pretrained(cls, path: str) -> ModelConfig:
        from transformers import AutoConfig

        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"no config.json in model directory {path!r}")
        with open(cfg_file) as f:
            raw = json.load(f)
        arch = raw.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported model_type {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        hf = AutoConfig.from_pretrained(path)
        text = _text_config(hf.text_config, raw)
        return cls(
            model_path=os.path.abspath(path),
            arch=arch,
            text=text,
            image_token_id=hf.image_token_id,
            vision_start_token_id=hf.vision_start_token_id,
            vision_end_token_id=hf.vision_end_token_id,
            spatial_merge_size=hf.vision_config.spatial_merge_size,
            eos_token_ids=_eos_ids(path, hf.text_config),
            dtype=parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            hf_config=hf,
        )


def _text_config(tc: Any, raw: dict) -> TextConfig:
    rope = tc.rope_parameters or {}
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    section = tuple(rope.get("mrope_section") or (16, 24, 24))
    if sum(section) * 2 != head_dim:
        raise ValueError(f"mrope_section {section} does not cover head_dim {head_dim}")
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
        rope_theta=float(rope.get("rope_theta", 1e6)),
        mrope_section=section,
        max_position_embeddings=tc.max_position_embeddings,
        tie_word_embeddings=tie,
    )


def _eos_ids(path: str, tc: Any) -> tuple[int, ...]:
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


def add_engine_switches(ap: Any, scope: str = "", caching_scope: str | None = None) -> None:
    """The command-line flags for `EngineConfig`'s switches, for the processes that run an engine
    (the router's local backend, the nodes); `scope` / `caching_scope` start their help texts
    (which of the process's modes the flag is for)."""
    ap.add_argument("--disable-overlap-schedule", action="store_true",
                    help=f"{scope}read each step's tokens before scheduling the next (default: each step is "
                         "launched while the step before still runs, see README)")
    ap.add_argument("--disable-prefix-caching", action="store_true",
                    help=f"{scope if caching_scope is None else caching_scope}compute every prompt in full "
                         "(default: a prompt whose prefix is cached takes those KV pages, see README)")
