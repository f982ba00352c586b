"""Llama-3.2-Vision (`mllama`, cross-attention) in the offline Engine: greedy output equals
transformers token for token (float32, tiny checkpoint, prompts from its own chat template) for
text only, one image, two images of different tile counts, text before / between / after images,
consecutive images and a prompt of several chunks; the image rows live in pages of the KV pool
(a batch mixing image and text-only requests, preemption under a small pool, a prefix-cache hit
on the same image keyed by it, never across images)."""

from __future__ import annotations

import pytest
from PIL import Image
from support import IMAGE, family_prompt, hf_generate, noise_image

from epd import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 10}
LONG_TEXT = " ".join(f"word{i} and the picture of color {i % 7}" for i in range(40))
CASES = {
    "text_only": (("Hello, tell me a story about a red cat.",), []),
    "one_image": ((IMAGE, "Describe this picture."), [(120, 80)]),
    "two_images_different_tiles": ((IMAGE, IMAGE, "Compare them."), [(64, 200), (300, 90)]),
    "text_between_images": (("First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(90, 90), (140, 56)]),
    "text_before_one_image": (("Some words first, then", IMAGE, " a question."), [(200, 150)]),
    "long_multi_chunk": ((LONG_TEXT, IMAGE, "Summarise."), [(200, 150)]),
}


def _images(sizes):
    return [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module")
def engine(tiny_models):
    llm = Engine(model_path=tiny_models["mllama"], device="cpu", page_size=4, max_step_tokens=48)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers(engine, case):
    prompt, images = family_prompt(engine.tokenizer, *CASES[case][0]), _images(CASES[case][1])
    out = engine.generate(prompt=prompt, image_data=images or None, sampling_params=GREEDY)
    inp = engine.core.inputs.process(prompt=prompt, image_data=images)
    if case == "long_multi_chunk":
        assert len(inp.input_ids) > 3 * 48, "the long case must need several chunks"
    assert inp.input_ids.count(engine.core.model_config.image_token_id) == len(images)   # one token an image
    expected = hf_generate(engine.core.model_config.model_path, inp.input_ids, images, GREEDY["max_new_tokens"])
    assert out["output_ids"] == expected
    assert out["meta_info"]["prompt_tokens"] == len(inp.input_ids)


def test_the_image_reaches_the_text_model(engine):
    """Two different images under the same text give different answers (the cross-attention layers
    read them), and each is transformers'."""
    prompt = family_prompt(engine.tokenizer, IMAGE, "Describe this picture.")
    outs = []
    for image in (noise_image(120, 80, seed=1), Image.new("RGB", (120, 80), (250, 20, 20))):
        out = engine.generate(prompt=prompt, image_data=[image], sampling_params=GREEDY)["output_ids"]
        ids = engine.core.inputs.process(prompt=prompt, image_data=[image]).input_ids
        assert out == hf_generate(engine.core.model_config.model_path, ids, [image], GREEDY["max_new_tokens"])
        outs.append(out)
    assert outs[0] != outs[1]


def test_batch_mixing_image_and_text_only_requests_equals_each_alone(tiny_models):
    with Engine(model_path=tiny_models["mllama"], device="cpu", dtype="float64", page_size=4,
                max_step_tokens=48) as llm:
        prompts, images, params = [], [], []
        for i, case in enumerate(list(CASES) * 2):
            prompts.append(family_prompt(llm.tokenizer, *CASES[case][0]))
            images.append(_images(CASES[case][1]))
            params.append({"temperature": 0, "max_new_tokens": 3 + 2 * i, "ignore_eos": True})
        alone = [llm.generate(prompt=p, image_data=im or None, sampling_params=sp)["output_ids"]
                 for p, im, sp in zip(prompts, images, params, strict=True)]
        batched = llm.generate(prompt=prompts, image_data=images, sampling_params=params)
        assert [b["output_ids"] for b in batched] == alone
        llm.check_integrity()
        assert llm.core.kv.pool.num_in_use == 0


def test_preemption_under_a_small_pool_keeps_outputs(tiny_models):
    """Image rows take pages too: a pool that cannot hold the batch's prompts and image rows at
    once preempts (freeing both) and recomputes (writing the rows again); tokens are a roomy engine's."""
    from transformers import AutoTokenizer

    path = tiny_models["mllama"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [family_prompt(tokenizer, IMAGE, "Story: " + LONG_TEXT[: 60 + 30 * i]) for i in range(6)]
    images = [[noise_image(100 + 20 * i, 90, seed=i)] for i in range(6)]
    params = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    with Engine(model_path=path, device="cpu", dtype="float64", page_size=4, disable_prefix_caching=True) as roomy:
        expected = [o["output_ids"] for o in roomy.generate(prompt=prompts, image_data=images,
                                                              sampling_params=[params] * 6)]
    with Engine(model_path=path, device="cpu", dtype="float64", page_size=4, kv_cache_tokens=700,
                disable_prefix_caching=True) as tight:
        got = [o["output_ids"] for o in tight.generate(prompt=prompts, image_data=images, sampling_params=[params] * 6)]
        assert tight.core.scheduler.num_preemptions > 0
        tight.check_integrity()
        assert tight.core.kv.pool.num_in_use == 0
    assert got == expected


def test_a_prefix_cache_hit_needs_the_same_image(engine, monkeypatch):
    """The same image and text again: its prompt's pages and its image rows come from the cache (the
    vision tower does not run), with the logprobs of the run that computed them; another image
    under the same text shares nothing (every token's KV depends on the request's images)."""
    encoded = []
    encode = engine.core.vision.encode
    monkeypatch.setattr(engine.core.vision, "encode", lambda images: encoded.append(len(images)) or encode(images))
    prompt = family_prompt(engine.tokenizer, "A long preamble about colors and shapes.", IMAGE, "What is it?")
    params = {"temperature": 0, "max_new_tokens": 6, "logprobs": True}
    image = noise_image(150, 100, seed=7)
    first = engine.generate(prompt=prompt, image_data=[image], sampling_params=params)
    assert encoded == [1]
    again = engine.generate(prompt=prompt, image_data=[image], sampling_params=params)
    assert encoded == [1], "the image rows were cached: no vision forward"
    other = engine.generate(prompt=prompt, image_data=[noise_image(150, 100, seed=8)], sampling_params=params)
    assert encoded == [1, 1]
    assert first["meta_info"]["cached_tokens"] == 0
    assert again["meta_info"]["cached_tokens"] >= 4 * (first["meta_info"]["prompt_tokens"] // 4 - 1)
    assert again["output_ids"] == first["output_ids"]
    assert again["meta_info"]["output_token_logprobs"] == pytest.approx(first["meta_info"]["output_token_logprobs"],
                                                                       abs=1e-5)
    assert other["meta_info"]["cached_tokens"] == 0


def test_image_rows_cached_alone_serve_another_prompt_with_the_same_image(engine, monkeypatch):
    """Different text, same image: the image rows are shared (one vision forward for both), and
    each answer is still transformers'."""
    encoded = []
    encode = engine.core.vision.encode
    monkeypatch.setattr(engine.core.vision, "encode", lambda images: encoded.append(len(images)) or encode(images))
    image = noise_image(130, 70, seed=11)
    for text in ("Describe it.", "What colors does it have?"):
        prompt = family_prompt(engine.tokenizer, IMAGE, text)
        out = engine.generate(prompt=prompt, image_data=[image], sampling_params=GREEDY)
        ids = engine.core.inputs.process(prompt=prompt, image_data=[image]).input_ids
        assert out["output_ids"] == hf_generate(engine.core.model_config.model_path, ids, [image],
                                                GREEDY["max_new_tokens"])
    assert encoded == [1]
