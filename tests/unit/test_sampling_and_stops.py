"""Sampling controls and stop rules, as a user of the Engine sees them."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from support import chat_prompt, hf_generate

from epd import Engine

PROMPT = chat_prompt("Tell me about the blue dog and the red cat.")


@pytest.fixture(scope="module")
def engine(tiny_models):
    # float64 so that seeded sampling is compared without float32 batch noise (see test_engine_correctness)
    llm = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", dtype="float64")
    yield llm
    llm.check_integrity()
    llm.shutdown()


def _gen(engine, **params):
    return engine.generate(prompt=PROMPT, sampling_params={"max_new_tokens": 16, **params})


def test_seed_is_reproducible_and_matters(engine):
    a = _gen(engine, temperature=1.0, seed=7)["output_ids"]
    b = _gen(engine, temperature=1.0, seed=7)["output_ids"]
    c = _gen(engine, temperature=1.0, seed=8)["output_ids"]
    greedy = _gen(engine, temperature=0)["output_ids"]
    assert a == b
    assert a != c and a != greedy


def test_seeded_request_in_a_batch_equals_alone(engine):
    alone = _gen(engine, temperature=0.9, top_p=0.9, seed=3)["output_ids"]
    others = [chat_prompt(f"another prompt {i}") for i in range(5)]
    outs = engine.generate(prompt=[*others, PROMPT],
                           sampling_params=[{"temperature": 1.0, "max_new_tokens": 9}] * 5
                           + [{"temperature": 0.9, "top_p": 0.9, "seed": 3, "max_new_tokens": 16}])
    assert outs[-1]["output_ids"] == alone


@pytest.mark.parametrize("params", [{"temperature": 1.0, "top_k": 1}, {"temperature": 5.0, "top_p": 1e-6},
                                    {"temperature": 5.0, "min_p": 1.0}])
def test_filters_that_leave_one_token_equal_greedy(engine, params):
    assert _gen(engine, seed=1, **params)["output_ids"] == _gen(engine, temperature=0)["output_ids"]


def test_stop_string_cuts_the_text(engine):
    full = _gen(engine, temperature=0, max_new_tokens=24)
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    out = _gen(engine, temperature=0, max_new_tokens=24, stop=[stop, "never-appears"])
    assert out["text"] == text[: text.index(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert len(out["output_ids"]) < len(full["output_ids"])


def test_stop_token_ids_and_min_new_tokens(engine):
    ids = _gen(engine, temperature=0)["output_ids"]
    stop_id = ids[3]
    first = ids.index(stop_id)
    out = _gen(engine, temperature=0, stop_token_ids=[stop_id])
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    held = _gen(engine, temperature=0, stop_token_ids=[stop_id], min_new_tokens=first + 3)
    assert stop_id not in held["output_ids"][: first + 3]
    assert len(held["output_ids"]) >= first + 3


def test_eos_from_generation_config_and_ignore_eos(tiny_models, tmp_path):
    """A checkpoint whose generation_config names token X as EOS stops at X unless ignore_eos."""
    src = tiny_models["qwen2_5_vl"]
    with Engine(model_path=src, device="cpu") as llm:
        ids = llm.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 12})["output_ids"]
    dst = tmp_path / "eos-model"
    shutil.copytree(src, dst)
    gen_cfg = json.loads((dst / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [ids[4]]
    (dst / "generation_config.json").write_text(json.dumps(gen_cfg))
    with Engine(model_path=str(dst), device="cpu") as llm:
        stopped = llm.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 12})
        ignored = llm.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 12,
                                                               "ignore_eos": True})
    assert stopped["output_ids"] == ids[: ids.index(ids[4]) + 1]
    assert stopped["meta_info"]["finish_reason"]["type"] == "stop"
    assert ignored["output_ids"] == ids


def test_streaming_text_equals_final_text(engine):
    final = _gen(engine, temperature=0, max_new_tokens=20)
    chunks = list(engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 20},
                                  stream=True))
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert [c["token_id"] for c in chunks] == final["output_ids"]
    assert chunks[-1]["finished"] and not any(c["finished"] for c in chunks[:-1])


def test_logprobs_are_returned(engine):
    out = _gen(engine, temperature=0, logprobs=True)
    lps = out["meta_info"]["output_token_logprobs"]
    assert len(lps) == len(out["output_ids"]) and all(lp <= 0 for lp in lps)


def test_logit_bias_equals_transformers_with_the_same_bias(engine, tiny_models):
    """Greedy with logit_bias against transformers' greedy with the bias added to its logits: the
    answer's first token banned (-100) and its second favoured (+3), so the path changes."""
    plain = _gen(engine, temperature=0)
    first, second = plain["output_ids"][:2]
    bias = {first: -100.0, second: 3.0}
    out = _gen(engine, temperature=0, logit_bias=bias)
    prompt_ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    expected = hf_generate(tiny_models["qwen2_5_vl"], prompt_ids, [], 16, torch.float64, logit_bias=bias)
    assert out["output_ids"] == expected != plain["output_ids"]
    assert first not in out["output_ids"]
    drawn = _gen(engine, temperature=1.0, seed=5, logit_bias={t: -100.0 for t in plain["output_ids"]})
    assert not set(drawn["output_ids"]) & set(plain["output_ids"])      # sampled rows are biased too


@pytest.mark.parametrize("bias, text", [({"x": 1}, "must map token ids"), ({5: 101.0}, "[-100, 100]"),
                                        ({10**7: 1.0}, "outside the vocabulary")])
def test_bad_logit_bias_is_refused(engine, bias, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        _gen(engine, logit_bias=bias)
