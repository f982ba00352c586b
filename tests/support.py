"""Test helpers: images, prompts, and the `transformers` reference every output is checked against."""

from __future__ import annotations

import functools
import importlib
import io
import json
import os

import numpy as np
import torch
from PIL import Image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# every family's tiny checkpoint (the `tiny_models` fixture); "ARCH:PRESET" names another tiny preset of ARCH
ARCHS = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "llava_onevision")
LLAVA_BACKBONES = ("llava_next:tiny-vicuna", "llava_next:tiny-llama3")


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


# model_type -> transformers' PIL image processor (the reference: no torchvision on the CPU machines)
_PROCESSORS = {
    "qwen2_vl": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
    "qwen2_5_vl": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
    "llava": "transformers.models.llava.image_processing_pil_llava.LlavaImageProcessorPil",
    "llava_next": "transformers.models.llava_next.image_processing_pil_llava_next.LlavaNextImageProcessorPil",
    "llava_onevision": "transformers.models.llava_onevision.image_processing_pil_llava_onevision."
                       "LlavaOnevisionImageProcessorPil",
    "mllama": "transformers.models.mllama.image_processing_pil_mllama.MllamaImageProcessorPil",
}


def model_type(path: str) -> str:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["model_type"]


@functools.lru_cache(maxsize=8)
def hf_image_processor(path: str):
    module, _, name = _PROCESSORS[model_type(path)].rpartition(".")
    return getattr(importlib.import_module(module), name).from_pretrained(path)


def hf_image_inputs(path: str, images: list[Image.Image], ids: torch.Tensor, image_token_id: int,
                    dtype: torch.dtype, device: str = "cpu") -> dict:
    """The keyword arguments transformers' model takes for `images` (its own processor's output)."""
    if model_type(path) == "mllama":
        return _mllama_inputs(path, images, ids, image_token_id, dtype, device)
    if model_type(path) == "llama4":   # transformers' processor needs torchvision: ours (checked against it on GPU)
        from epd.config import ModelConfig

        pre = ModelConfig.from_pretrained(path).family.image_processor().preprocess_many(images)
        return {"pixel_values": torch.cat([p.pixels.tiles for p in pre]).to(device, dtype)}
    one_prompt = [images] if model_type(path) == "llava_onevision" else images   # OneVision counts a prompt's images
    feats = hf_image_processor(path)(images=one_prompt, return_tensors="pt")
    kwargs = {"pixel_values": feats["pixel_values"].to(device, dtype)}
    if "image_grid_thw" in feats:      # Qwen2-VL family
        kwargs.update(image_grid_thw=feats["image_grid_thw"].to(device),
                      mm_token_type_ids=(ids == image_token_id).int().to(device))
    if "image_sizes" in feats:         # LLaVA-NeXT / OneVision
        kwargs["image_sizes"] = feats["image_sizes"].to(device)
    if "batch_num_images" in feats:    # OneVision's processor: several images -> base views only
        kwargs["batch_num_images"] = feats["batch_num_images"].to(device)
    return kwargs


def family_prompt(tokenizer, *parts: str) -> str:
    """A one-turn chat rendered with the checkpoint's own template; parts are text or IMAGE, in order."""
    from epd.chat.conversation import render_messages

    content = [{"type": "image_url", "image_url": {"url": "x"}} if p == IMAGE else {"type": "text", "text": p}
               for p in parts]
    return render_messages([{"role": "user", "content": content}], tokenizer=tokenizer).text


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
        kwargs = hf_image_inputs(path, images, ids, model.config.image_token_id, dtype)
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


def _mllama_inputs(path: str, images: list[Image.Image], ids: torch.Tensor, image_token_id: int,
                   dtype: torch.dtype, device: str) -> dict:
    """Llama-3.2-Vision: pixels, aspect ratios and the cross-attention mask as MllamaProcessor
    builds them for one prompt."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    processor = hf_image_processor(path)
    feats = processor(images=[images], return_tensors="pt")
    sparse = [get_cross_attention_token_mask(ids[0].tolist(), image_token_id)]
    mask = convert_sparse_cross_attention_mask_to_dense(sparse, feats["num_tiles"], processor.max_image_tiles,
                                                        ids.shape[1])
    return {"pixel_values": feats["pixel_values"].to(device, dtype),
            "aspect_ratio_ids": feats["aspect_ratio_ids"].to(device),
            "aspect_ratio_mask": feats["aspect_ratio_mask"].to(device),
            "cross_attention_mask": torch.as_tensor(mask).to(device)}
