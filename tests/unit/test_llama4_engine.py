"""Llama 4 (`llama4`: MoE, chunked RoPE / global NoPE attention, tiled images) in the offline Engine,
token for token against transformers' `Llama4ForConditionalGeneration` on the tiny checkpoint
(float32; chunks of 8 positions, so every prompt here spans several): text only, one image, several
images with tiles and a global view, text around them; a batch mixing image and text-only requests
equals each alone; SGLang's precomputed-embeddings call (the projector's rows, the processor's
expanded prompt) gives the pixel path's tokens. transformers' own image processor needs
torchvision (the GPU host has it: tests/gpu/test_llama4_processor.py), so its model is fed our
processor's pixel values."""

from __future__ import annotations

import pytest
import torch
from support import IMAGE, family_prompt, noise_image

from epd import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 10}
CASES = {
    "text_only": (("Hello, tell me a long story about a red cat and a lighthouse by the sea.",), []),
    "one_image": ((IMAGE, "Describe this picture."), [(120, 80)]),
    "tiled_images": (("First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(200, 60), (90, 180)]),
    "one_tile_and_tiles": ((IMAGE, IMAGE, "Compare them."), [(40, 40), (300, 90)]),
}


@pytest.fixture(scope="module")
def engine(tiny_models):
    llm = Engine(model_path=tiny_models["llama4"], device="cpu", page_size=4, max_step_tokens=48)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_models):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(tiny_models["llama4"], dtype=torch.float32).eval()


def _images(sizes):
    return [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def _expected(reference, inp, max_new: int) -> list[int]:
    ids = torch.tensor([inp.input_ids])
    kwargs = {"pixel_values": torch.cat([im.pixels.pixels.tiles for im in inp.images]).float()} if inp.images else {}
    with torch.inference_mode():
        out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers(engine, reference, case):
    prompt, images = family_prompt(engine.tokenizer, *CASES[case][0]), _images(CASES[case][1])
    out = engine.generate(prompt=prompt, image_data=images or None, sampling_params=GREEDY)
    inp = engine.core.inputs.process(prompt=prompt, image_data=images)
    assert len(inp.input_ids) > 3 * 8, "longer than several attention chunks"
    if case == "tiled_images":
        assert all(im.layout.dims[0] * im.layout.dims[1] > 1 for im in inp.images), "tiles and a global view"
    assert out["output_ids"] == _expected(reference, inp, GREEDY["max_new_tokens"])


def test_batch_mixing_image_and_text_only_requests_equals_each_alone(tiny_models):
    with Engine(model_path=tiny_models["llama4"], device="cpu", dtype="float64", page_size=4,
                max_step_tokens=48) as llm:
        prompts = [family_prompt(llm.tokenizer, *CASES[case][0]) for case in list(CASES) * 2]
        images = [_images(CASES[case][1]) for case in list(CASES) * 2]
        params = [{"temperature": 0, "max_new_tokens": 3 + 2 * i, "ignore_eos": True} for i in range(len(prompts))]
        alone = [llm.generate(prompt=p, image_data=im or None, sampling_params=sp)["output_ids"]
                 for p, im, sp in zip(prompts, images, params, strict=True)]
        batched = llm.generate(prompt=prompts, image_data=images, sampling_params=params)
        assert [b["output_ids"] for b in batched] == alone
        llm.check_integrity()


def test_precomputed_embeddings_give_the_pixel_paths_tokens(engine):
    """SGLang's call: `vision_model` + `multi_modal_projector` rows of every tile, no grid, with the
    processor's expanded prompt (its image block says the tiles' layout)."""
    prompt = family_prompt(engine.tokenizer, *CASES["tiled_images"][0])
    images = _images(CASES["tiled_images"][1])
    from_pixels = engine.generate(prompt=prompt, image_data=images, sampling_params=GREEDY)
    inp = engine.core.inputs.process(prompt=prompt, image_data=images)
    items = [{"modality": "IMAGE", "precomputed_embeddings": emb}
             for emb in engine.core.vision.encode([im.pixels for im in inp.images])]
    from_rows = engine.generate(input_ids=inp.input_ids, image_data=items, sampling_params=GREEDY)
    assert from_rows["output_ids"] == from_pixels["output_ids"]
    several = items[0]["precomputed_embeddings"]
    with pytest.raises(ValueError, match="several tiles"):
        engine.core.inputs.process(prompt=prompt, image_data=[{"precomputed_embeddings": several}] * 2)
