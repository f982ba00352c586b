"""Greedy output of the offline Engine equals transformers token for token (float32, tiny checkpoints
of every family; prompts rendered with each checkpoint's own chat template)."""

from __future__ import annotations

import pytest
from support import ARCHS, IMAGE, LLAVA_BACKBONES, family_prompt, hf_generate, noise_image

from epd import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 12}

LONG_TEXT = " ".join(f"word{i} and the picture of color {i % 7}" for i in range(60))

# (prompt parts, image sizes (w, h)); anyres families: (64, 200) and (300, 90) need several crops,
# (50, 50) one tile (OneVision)
CASES = {
    "text_only": (("Hello, tell me a story about a red cat.",), []),
    "one_image": ((IMAGE, "Describe this picture."), [(120, 80)]),
    "two_images_different_shapes": ((IMAGE, IMAGE, "Compare them."), [(64, 200), (300, 90)]),
    "one_tile_and_several_crops": ((IMAGE, IMAGE, "Which is larger?"), [(50, 50), (300, 90)]),
    "interleaved": (("First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(90, 90), (140, 56)]),
    "long_multi_chunk": ((LONG_TEXT, IMAGE, "Summarise."), [(200, 150)]),
}


def _prompt(llm: Engine, case: str) -> str:
    return family_prompt(llm.tokenizer, *CASES[case][0])


@pytest.fixture(scope="module", params=ARCHS + LLAVA_BACKBONES)
def engine(request, tiny_models):
    # Small pages and a small step budget so every image prompt spans several chunks and pages.
    llm = Engine(model_path=tiny_models[request.param], device="cpu", page_size=4, max_step_tokens=48)
    yield llm
    llm.shutdown()


def _images(sizes):
    return [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers(engine, case):
    prompt, sizes = _prompt(engine, case), CASES[case][1]
    images = _images(sizes)
    out = engine.generate(prompt=prompt, image_data=images or None, sampling_params=GREEDY)
    inp = engine.core.inputs.process(prompt=prompt, image_data=images)
    if case == "long_multi_chunk":
        assert len(inp.input_ids) > 4 * 48, "the long case must need several chunks"
    expected = hf_generate(engine.core.model_config.model_path, inp.input_ids, images, GREEDY["max_new_tokens"])
    assert out["output_ids"] == expected
    assert out["meta_info"]["prompt_tokens"] == len(inp.input_ids)
    assert out["meta_info"]["completion_tokens"] == len(expected)
    assert len(set(out["output_ids"])) > 2, "random weights should not repeat one token"


def test_precomputed_embeddings_match_pixels(engine):
    """The projector's output handed in (SGLang's precomputed_embeddings item) gives the pixel
    path's tokens; Qwen2-VL items also carry their grid, as SGLang's do."""
    prompt, sizes = _prompt(engine, "two_images_different_shapes"), CASES["two_images_different_shapes"][1]
    images = _images(sizes)
    from_pixels = engine.generate(prompt=prompt, image_data=images, sampling_params=GREEDY)
    items = []
    for im in engine.core.inputs.process(prompt=prompt, image_data=images).images:   # laid out as in this prompt
        item = {"modality": "IMAGE", "precomputed_embeddings": engine.core.vision.encode([im.pixels])[0]}
        if engine.core.model_config.model_type.startswith("qwen"):
            item["image_grid_thw"] = im.layout.dims
        items.append(item)
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    from_embeddings = engine.generate(input_ids=ids, image_data=items, sampling_params=GREEDY)
    assert from_embeddings["output_ids"] == from_pixels["output_ids"]


@pytest.fixture(scope="module", params=ARCHS)
def engine64(request, tiny_models):
    """float64: batched GEMMs differ from single-row ones in the last float32 bit, which flips
    genuine 1-ULP ties between top logits (seen with these random weights). In float64 the
    comparison isolates what batching must not change: which tokens each request gets."""
    llm = Engine(model_path=tiny_models[request.param], device="cpu", dtype="float64", page_size=4,
                 max_step_tokens=48)
    yield llm
    llm.check_integrity()
    llm.shutdown()


def test_batch_of_mixed_requests_equals_each_alone(engine64):
    engine = engine64
    prompts, images, params = [], [], []
    for i, case in enumerate(list(CASES) * 2):
        prompt, sizes = _prompt(engine, case), CASES[case][1]
        prompts.append(prompt)
        images.append(_images(sizes))
        params.append({"temperature": 0, "max_new_tokens": 3 + 2 * i, "ignore_eos": True})
    alone = [engine.generate(prompt=p, image_data=im or None, sampling_params=sp)["output_ids"]
             for p, im, sp in zip(prompts, images, params, strict=True)]
    batched = engine.generate(prompt=prompts, image_data=images, sampling_params=params)
    assert len(batched) == 2 * len(CASES)
    assert [b["output_ids"] for b in batched] == alone
    assert [len(b["output_ids"]) for b in batched] == [3 + 2 * i for i in range(2 * len(CASES))]


def test_preemption_under_a_tight_kv_pool_keeps_outputs(tiny_models):
    """A pool too small for the whole batch forces preemption + recompute, while the prompts share
    long prefixes through the prefix cache (pages with several owners, some preempted, some
    evicted); tokens must be those of a roomy engine computing everything itself."""
    path = tiny_models["qwen2_5_vl"]
    from support import chat_prompt

    prompts = [chat_prompt("Story: " + LONG_TEXT[: 80 + 40 * i] + f" Number {i}.") for i in range(8)]
    params = {"temperature": 0, "max_new_tokens": 24}
    with Engine(model_path=path, device="cpu", dtype="float64", page_size=4, disable_prefix_caching=True) as roomy:
        expected = [o["output_ids"] for o in roomy.generate(prompt=prompts, sampling_params=[params] * 8)]
    with Engine(model_path=path, device="cpu", dtype="float64", page_size=4, kv_cache_tokens=600) as tight:
        outs = tight.generate(prompt=prompts, sampling_params=[params] * 8)
        got = [o["output_ids"] for o in outs]
        assert tight.core.scheduler.num_preemptions > 0
        assert sum(o["meta_info"]["cached_tokens"] for o in outs) > 0
        tight.check_integrity()
        assert tight.core.kv.pool.num_in_use == 0
    assert got == expected
