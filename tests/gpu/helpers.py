"""Helpers for the GPU tests: transformers on the GPU, a head_dim-128 small checkpoint, forced decoding.

The tiny checkpoints have head_dim 16, which flashinfer has no kernels for, so the flashinfer
tests use `small128_checkpoint`: the tiny architecture with 128-wide heads, in bf16.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from PIL import Image
from support import hf_image_inputs

from epd.engine.engine_core import EngineCore
from epd.engine.inputs import ProcessedInput


@functools.lru_cache(maxsize=2)
def hf_model_on(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()


def hf_inputs(path: str, input_ids: list[int], images: list[Image.Image], model, device: str) -> dict:
    ids = torch.tensor([input_ids], device=device)
    kwargs: dict = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if images:
        kwargs.update(hf_image_inputs(path, images, ids, model.config.image_token_id, model.dtype, device))
    return kwargs


def hf_generate_on(path: str, input_ids: list[int], images: list[Image.Image], max_new_tokens: int,
                   device: str = "cuda", dtype: torch.dtype = torch.float32) -> list[int]:
    """Greedy tokens from transformers on `device` (as support.hf_generate does on the CPU)."""
    model = hf_model_on(path, device, dtype)
    with torch.inference_mode():
        out = model.generate(**hf_inputs(path, input_ids, images, model, device), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(input_ids):].tolist()


def small128_checkpoint(root: str, arch: str = "qwen2_5_vl") -> str:
    """The tiny checkpoint of `arch` (qwen2_5_vl or mllama) with 2 query heads / 1 KV head of width
    128 (flashinfer's and the graph kernels' head size), bf16."""
    from transformers import AutoConfig

    from epd.models.tiny_model import random_state_dict, save_weights, write_tiny_model

    path = write_tiny_model(arch, root, "tiny", seed=1)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    wide = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1)
    cfg["torch_dtype"] = "bfloat16"
    if arch == "mllama":
        cfg["text_config"].update(wide)
    else:
        cfg.update(wide, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
        cfg["vision_config"]["out_hidden_size"] = 256
    with open(cfg_file, "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(path, name))
    save_weights(random_state_dict(AutoConfig.from_pretrained(path), 1, "cpu", torch.bfloat16), path)
    return path


def forced_logits(core: EngineCore, inputs: list[ProcessedInput], forced: list[list[int]]) -> list[torch.Tensor]:
    """Run the engine's scheduler and runner with the next tokens given (not sampled), so that two
    engines see identical inputs at every step. Returns each step's logits (float32, CPU)."""
    from epd.engine.sampling import SamplingParams

    reqs = []
    for inp, toks in zip(inputs, forced, strict=True):
        req = core.new_request(inp, SamplingParams(max_new_tokens=len(toks) + 1))
        core.add(req)
        reqs.append((req, list(toks)))
    steps = []
    while core.scheduler.has_work():
        chunks = core.scheduler.schedule()
        core._encode_images([c.req for c in chunks if c.req.inp.images and c.req.needs_encoding()])
        logits = core.runner.run(chunks)
        core.scheduler.advance(chunks)
        steps.append(logits.float().cpu().clone())
        for c in (c for c in chunks if c.samples):
            todo = next(t for r, t in reqs if r is c.req)
            if todo:
                c.req.output_ids.append(todo.pop(0))
            else:
                core.scheduler.finish(c.req, {"type": "length"})
    return steps


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def assert_steps_close(got: list[torch.Tensor], ref: list[torch.Tensor], label: str = "") -> None:
    """Two `forced_logits` runs: as many steps, each row's logits within cosine 0.999 of the reference's."""
    assert len(got) == len(ref)
    for step, (a, b) in enumerate(zip(got, ref, strict=True)):
        cos = cosine_rows(a, b)
        assert (cos > 0.999).all(), f"step {step}: cosine {cos.min():.5f}{label}"
