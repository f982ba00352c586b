"""Automatic prefix caching: a request takes the KV pages of the longest prefix another request
computed (same tokens, same images), and still answers as transformers does from scratch."""

from __future__ import annotations

import pytest
from support import IMAGE, chat_prompt, hf_generate, noise_image

from epd import Engine
from epd.engine.kv_pool import OutOfPagesError, PagePool

GREEDY = {"temperature": 0, "max_new_tokens": 8}
PAGE = 4
STORY = chat_prompt("Once upon a time a red cat and a blue dog lived in a small house by the sea. Go on.")


def test_pool_keeps_registered_pages_until_hit_or_evicted():
    pool = PagePool(num_pages=5, page_size=4)               # 4 pages to hand out
    a = pool.allocate(2)
    pool.register(a, [b"h0", b"h1"])
    pool.free(a)
    assert (pool.num_in_use, pool.num_cached, pool.num_free) == (0, 2, 4)
    assert pool.match([b"h0", b"h1", b"h2"]) == a and pool.cost(a) == 2
    pool.acquire(a[:1])
    pool.acquire(a[:1])                                      # two requests hold page a[0]
    assert pool.owner_counts() == {a[0]: 2} and pool.num_free == 3
    pool.free(a[:1])
    assert pool.num_in_use == 1                              # the other still holds it
    pool.free(a[:1])
    assert pool.num_cached == 2                              # cached again, now the most recent
    b = pool.allocate(3)                                     # 2 free pages, then the oldest cached one
    assert pool.evictions == 1 and a[1] in b and pool.match([b"h0", b"h1"]) == [a[0]]
    with pytest.raises(OutOfPagesError):
        pool.allocate(2)
    pool.check_integrity()
    pool.free(b)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(b[:1])
    pool.check_integrity()


@pytest.fixture(scope="module")
def engine(tiny_models):
    llm = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", page_size=PAGE, max_step_tokens=40)
    yield llm
    llm.shutdown()


def _run(engine: Engine, prompt: str, images=None, **params) -> tuple[dict, list[int]]:
    out = engine.generate(prompt=prompt, image_data=images, sampling_params={**GREEDY, **params})
    ids = engine.core.inputs.process(prompt=prompt, image_data=images or []).input_ids
    return out, ids


def _transformers(engine: Engine, ids: list[int], images=None) -> list[int]:
    return hf_generate(engine.core.model_config.model_path, ids, images or [], GREEDY["max_new_tokens"])


def test_the_same_prompt_again_takes_its_pages(engine):
    first, ids = _run(engine, STORY)
    again, _ = _run(engine, STORY)
    assert again["meta_info"]["cached_tokens"] == (len(ids) - 1) // PAGE * PAGE > first["meta_info"]["cached_tokens"]
    assert again["output_ids"] == first["output_ids"] == _transformers(engine, ids)


def test_a_follow_up_turn_reuses_the_answer_too(engine):
    """The next turn's prompt is this prompt, the answer, then more: the answer's pages (written
    during decode) are taken too."""
    first, ids = _run(engine, STORY)
    turn = engine.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n",
                                   add_special_tokens=False)
    ids2 = ids + first["output_ids"] + turn
    second = engine.generate(input_ids=ids2, sampling_params=GREEDY)
    computed = len(ids) + len(first["output_ids"]) - 1        # the last answer token never had its KV computed
    assert second["meta_info"]["cached_tokens"] == computed // PAGE * PAGE
    assert second["output_ids"] == _transformers(engine, ids2)


def test_images_are_part_of_the_prefix(engine, tiny_models):
    """The same image again is a hit past it, and skips the vision tower; another image of the
    same size (same tokens) is not: that request's logprobs are the ones computed without any
    cache, not the first image's (this tiny model's greedy tokens do not tell the two images
    apart, its logprobs do)."""
    prompt = chat_prompt("Look:", IMAGE, "What is it?")
    cat, dog = noise_image(48, 40, seed=1), noise_image(48, 40, seed=2)   # same size, other pixels
    tower, encoded = engine.core.vision, []
    encode = tower.encode
    tower.encode = lambda images: encoded.append(len(images)) or encode(images)   # counts, then runs
    try:
        first, ids = _run(engine, prompt, [cat], logprobs=True)
        again, _ = _run(engine, prompt, [cat], logprobs=True)
        other, _ = _run(engine, prompt, [dog], logprobs=True)
    finally:
        tower.encode = encode
    assert encoded == [1, 1], "the cached image must not go through the vision tower again"
    image_start = engine.core.inputs.process(prompt=prompt, image_data=[cat]).image_offsets[0]
    assert again["meta_info"]["cached_tokens"] == (len(ids) - 1) // PAGE * PAGE > image_start
    assert other["meta_info"]["cached_tokens"] == image_start // PAGE * PAGE   # the text before the image only
    assert again["output_ids"] == first["output_ids"] == _transformers(engine, ids, [cat])
    assert other["output_ids"] == _transformers(engine, ids, [dog])
    fresh = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", page_size=PAGE, disable_prefix_caching=True)
    try:
        alone, _ = _run(fresh, prompt, [dog], logprobs=True)
    finally:
        fresh.shutdown()
    lps = {name: out["meta_info"]["output_token_logprobs"] for name, out in
           (("again", again), ("first", first), ("other", other), ("alone", alone))}
    assert lps["again"] == pytest.approx(lps["first"], abs=1e-4)
    assert lps["other"] == pytest.approx(lps["alone"], abs=1e-4)
    assert max(abs(a - b) for a, b in zip(lps["other"], lps["first"], strict=True)) > 1e-2


def test_requests_running_together_share_a_prefix(engine):
    """With a 40-token step budget the long prompt is computed over several steps; the second
    request, admitted later, takes the pages its prefill has filled by then."""
    shared = " ".join(f"fact {i} about the harbour." for i in range(30))
    prompts = [chat_prompt(shared, " Question one?"), chat_prompt(shared, " Question two?")]
    outs = engine.generate(prompt=prompts, sampling_params=GREEDY)
    cached = [out["meta_info"]["cached_tokens"] for out in outs]
    assert cached[1] >= cached[0] + 40                     # more than the system prompt earlier tests left
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == _transformers(engine, engine.core.inputs.process(prompt=prompt).input_ids)


def test_a_small_pool_evicts_and_stays_correct(tiny_models):
    llm = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", page_size=PAGE, kv_cache_tokens=160)
    try:
        prompts = [chat_prompt(f"Tell me about the number {i} and its friends.") for i in range(8)]
        for prompt in prompts + prompts[:2]:
            out, ids = _run(llm, prompt)
            assert out["output_ids"] == _transformers(llm, ids)
            llm.check_integrity()
        assert llm.core.kv.pool.evictions > 0
    finally:
        llm.shutdown()


def test_off_when_disabled(tiny_models):
    llm = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", page_size=PAGE, disable_prefix_caching=True)
    try:
        _run(llm, STORY)
        again, _ = _run(llm, STORY)
        assert again["meta_info"]["cached_tokens"] == 0 and llm.core.kv.pool.num_cached == 0
    finally:
        llm.shutdown()


def test_cache_salt_keeps_tenants_from_sharing_cached_prefixes(tiny_models):
    """vLLM's cache_salt: the same prompt under another salt takes nothing from the cache (so
    `cached_tokens` tells one tenant nothing about another's prompts); under the same salt it does.
    The answers are the same either way."""
    with Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", page_size=PAGE) as llm:
        runs = [llm.generate(prompt=STORY, sampling_params={**GREEDY, "cache_salt": salt})
                for salt in ("tenant-a", "tenant-b", "tenant-a", "")]
    cached = [out["meta_info"]["cached_tokens"] for out in runs]
    assert cached[0] == 0 and cached[1] == 0, "another tenant's prompt is not cached for this one"
    assert cached[2] > 0, "the same tenant's is"
    assert cached[3] == 0, "no salt is a namespace of its own"
    assert len({tuple(out["output_ids"]) for out in runs}) == 1
