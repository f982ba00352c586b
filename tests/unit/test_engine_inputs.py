"""Bad input gets a clear exception naming the problem, leaks no KV pages, and the engine keeps working."""

from __future__ import annotations

import pytest
from support import IMAGE, chat_prompt, noise_image, png_bytes

from epd import Engine
from epd.engine.inputs import InputError
from epd.engine.sampling import SamplingParamError
from epd.media.loading import MediaError

GREEDY = {"temperature": 0, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def engine(tiny_models):
    llm = Engine(model_path=tiny_models["qwen2_vl"], device="cpu", page_size=8, max_model_len=512)
    yield llm
    llm.shutdown()


@pytest.fixture(autouse=True)
def _still_healthy(engine):
    yield
    engine.check_integrity()
    assert engine.core.kv.pool.num_in_use == 0
    ok = engine.generate(prompt=chat_prompt("still alive?"), sampling_params=GREEDY)
    assert ok["meta_info"]["completion_tokens"] == 6


def test_corrupt_image_bytes(engine):
    broken = png_bytes(noise_image(64, 64))[:200]
    with pytest.raises(MediaError, match="image 1"):
        engine.generate(prompt=chat_prompt(IMAGE, "hi"), image_data=[broken], sampling_params=GREEDY)


def test_unsupported_image_format(engine):
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    with pytest.raises(MediaError, match="(?i)format|image"):
        engine.generate(prompt=chat_prompt(IMAGE, "hi"), image_data=[pdf], sampling_params=GREEDY)


def test_prompt_longer_than_context(engine):
    long = chat_prompt(" ".join(["picture"] * 600), IMAGE)
    with pytest.raises(InputError, match="context is 512 tokens"):
        engine.generate(prompt=long, image_data=[noise_image(200, 200)], sampling_params=GREEDY)


@pytest.mark.parametrize("placeholders,images", [(2, 1), (1, 2), (0, 1)])
def test_placeholder_count_mismatch(engine, placeholders, images):
    prompt = chat_prompt(*[IMAGE] * placeholders, "compare")
    with pytest.raises(InputError, match=f"{placeholders} image placeholder.*{images} image"):
        engine.generate(prompt=prompt, image_data=[noise_image(64, 64, i) for i in range(images)],
                        sampling_params=GREEDY)


def test_unknown_sampling_parameter(engine):
    with pytest.raises(SamplingParamError, match="unknown sampling parameter.*temprature"):
        engine.generate(prompt=chat_prompt("hi"), sampling_params={"temprature": 0.5})


@pytest.mark.parametrize("bad", [{"top_p": 0}, {"temperature": -1}, {"max_new_tokens": 0}, {"n": 2}])
def test_out_of_range_sampling_parameter(engine, bad):
    with pytest.raises(SamplingParamError, match=next(iter(bad))):
        engine.generate(prompt=chat_prompt("hi"), sampling_params=bad)


def test_bad_item_in_a_batch_queues_nothing(engine):
    prompts = [chat_prompt("fine"), chat_prompt(IMAGE, "broken")]
    with pytest.raises(MediaError, match="image 1"):
        engine.generate(prompt=prompts, image_data=[[], [b"not an image at all"]],
                        sampling_params=[GREEDY, GREEDY])
    assert not engine.core.scheduler.waiting and not engine.core.scheduler.running


def test_precomputed_embeddings_of_wrong_shape(engine):
    import torch

    item = {"modality": "IMAGE", "image_grid_thw": (1, 4, 4), "precomputed_embeddings": torch.zeros(3, 64)}
    with pytest.raises(InputError, match=r"expected \(4, 64\)"):
        engine.generate(prompt=chat_prompt(IMAGE), image_data=[item], sampling_params=GREEDY)


def test_generation_stops_at_the_context_limit(tiny_models):
    """max_new_tokens beyond the context is capped: the request ends with finish_reason length."""
    with Engine(model_path=tiny_models["qwen2_vl"], device="cpu", page_size=4, kv_cache_tokens=64) as small:
        assert small.core.max_context == 64
        out = small.generate(prompt=chat_prompt("hi"), sampling_params={"max_new_tokens": 10_000,
                                                                          "temperature": 0, "ignore_eos": True})
        info = out["meta_info"]
        assert info["finish_reason"]["type"] == "length"
        assert info["prompt_tokens"] + info["completion_tokens"] == 64
        small.check_integrity()
        assert small.core.kv.pool.num_in_use == 0
