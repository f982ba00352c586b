"""Test helpers: images, prompts, and the `transformers` reference every output is checked against."""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from PIL import Image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def chat_prompt(*parts: str) -> str:
    """ChatML prompt (the Qwen2-VL format); parts are text or IMAGE placeholders, in order."""
    body = "".join(parts)
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n"
            f"<|im_start|>assistant\n")


@functools.lru_cache(maxsize=4)
def hf_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()


@functools.lru_cache(maxsize=4)
def hf_image_processor(path: str):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(path)


def hf_generate(path: str, input_ids: list[int], images: list[Image.Image], max_new_tokens: int,
                dtype: torch.dtype = torch.float32, logit_bias: dict[int, float] | None = None) -> list[int]:
    """Greedy tokens from transformers' own model and image processor on the same checkpoint
    (with `logit_bias` added to the logits before each argmax, as OpenAI's logit_bias does).

    `input_ids` must already hold the expanded image placeholders; transformers checks that the
    count matches the image features, so a wrong expansion on our side fails here too.
    """
    model = hf_model(path, dtype)
    ids = torch.tensor([input_ids])
    kwargs = {}
    if images:
        feats = hf_image_processor(path)(images=images, return_tensors="pt")
        kwargs = dict(pixel_values=feats["pixel_values"].to(dtype), image_grid_thw=feats["image_grid_thw"],
                      mm_token_type_ids=(ids == model.config.image_token_id).int())
    if logit_bias:
        from transformers import LogitsProcessorList

        token_ids, values = torch.tensor(list(logit_bias)), torch.tensor(list(logit_bias.values()), dtype=dtype)

        def add_bias(_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores.index_add(1, token_ids, values.to(scores.dtype).expand(scores.shape[0], -1))

        kwargs["logits_processor"] = LogitsProcessorList([add_bias])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, **kwargs)
    return out[0, len(input_ids):].tolist()
