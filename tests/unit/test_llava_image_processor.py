"""LLaVA image preprocessing against transformers: for every variant and a dozen sizes (tiny,
extreme aspect ratios, below one crop and far above the largest grid), our pixel values equal
transformers' PIL processor's bit for bit, and the image's token count (computed from its size
alone, as the router does) equals the number of `<image>` tokens transformers' own processor
expands the placeholder to, and the number of embeddings the vision encoder returns."""

from __future__ import annotations

import functools

import pytest
import torch
from support import hf_image_processor, noise_image

from epd.config import ModelConfig, load_tokenizer

SIZES = [(2, 2), (3, 700), (700, 3), (50, 50), (56, 56), (120, 80), (64, 200), (300, 90), (167, 941), (1000, 1000),
         (1920, 1080), (4000, 300)]   # (width, height); the tiny checkpoints' crops are 56 px


@functools.lru_cache(maxsize=4)
def _hf_processor(path: str, model_type: str):
    """transformers' processor of the checkpoint (OneVision's without its video processor, which
    needs torchvision: only its image-token count is asked of it)."""
    from transformers import LlavaNextProcessor, LlavaOnevisionProcessor, LlavaProcessor

    hf = ModelConfig.from_pretrained(path).family.hf
    side = hf.vision_config.image_size // hf.vision_config.patch_size
    if model_type == "llava_onevision":
        proc = object.__new__(LlavaOnevisionProcessor)
        proc.image_processor, proc.num_image_tokens = hf_image_processor(path), side * side
        proc.vision_aspect_ratio, proc.vision_feature_select_strategy = hf.vision_aspect_ratio, "full"
        return proc
    cls = LlavaProcessor if model_type == "llava" else LlavaNextProcessor
    return cls(image_processor=hf_image_processor(path), tokenizer=load_tokenizer(path), image_token="<image>",
               patch_size=hf.vision_config.patch_size, num_additional_image_tokens=1,
               vision_feature_select_strategy=hf.vision_feature_select_strategy)


def _hf_tokens(path: str, arch: str, image) -> int:
    """How many `<image>` tokens transformers' processor makes of one image in a prompt."""
    proc = _hf_processor(path, arch)
    if arch == "llava_onevision":
        crop = proc.image_processor.size["height"]
        return proc._get_number_of_features(image.height, image.width, crop, crop)
    ids = proc(text="<image>", images=[image], return_tensors="pt")["input_ids"][0]
    return int((ids == load_tokenizer(path).convert_tokens_to_ids("<image>")).sum())


@pytest.mark.parametrize("arch", ["llava", "llava_next", "llava_onevision"])
def test_pixels_and_token_counts_equal_transformers(tiny_models, arch):
    path = tiny_models[arch]
    family = ModelConfig.from_pretrained(path).family
    ours, encoder = family.image_processor(), family.build_vision("cpu", torch.float32)
    counts = set()
    for w, h in SIZES:
        image = noise_image(w, h, seed=w + h)
        pre = ours.preprocess_many([image])[0]
        want = hf_image_processor(path)(images=[image], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(pre.pixel_values, want if want.dim() == 4 else want[None]), (w, h)
        tokens = _hf_tokens(path, arch, image)
        assert ours.layout(image).num_tokens == pre.layout.num_tokens == tokens, (w, h)
        assert encoder.encode([pre])[0].shape[0] == tokens, (w, h)
        counts.add(tokens)
    assert len(counts) == 1 if arch == "llava" else len(counts) > 5, "LLaVA-1.5: one count; anyres: many"


def test_onevision_lays_out_each_image_of_several_as_one_view(tiny_models):
    """transformers' OneVision processor and model show each image of a prompt with several as its
    padded base view only (+ a newline token), whatever its size."""
    path = tiny_models["llava_onevision"]
    family = ModelConfig.from_pretrained(path).family
    ours, encoder = family.image_processor(), family.build_vision("cpu", torch.float32)
    images = [noise_image(w, h, seed=w) for w, h in [(120, 80), (64, 200), (1000, 1000)]]
    want = hf_image_processor(path)(images=[images], return_tensors="pt")["pixel_values"]   # one prompt
    layouts = [ours.layout(im, count=3) for im in images]
    pres = ours.preprocess_many(images, layouts)
    side = family.hf.vision_config.image_size // family.hf.vision_config.patch_size
    for i, pre in enumerate(pres):
        assert layouts[i].num_tokens == side * side + 1 and torch.equal(pre.pixel_values, want[i])
    assert [e.shape[0] for e in encoder.encode(pres)] == [side * side + 1] * 3
