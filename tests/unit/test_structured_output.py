"""Structured output (`response_format`): even a random model answers with JSON that follows the
schema, greedy or sampled, alone or batched with free-text requests (which keep their tokens)."""

from __future__ import annotations

import json

import pytest
from support import chat_prompt

from epd import Engine
from epd.engine.inputs import InputError
from epd.engine.sampling import SamplingParamError

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "ok", "count"],
          "properties": {"color": {"enum": ["red", "blue", "green"]}, "ok": {"type": "boolean"},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99}}}
RF = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
PROMPT = chat_prompt("Describe the picture as JSON.")


@pytest.fixture(scope="module")
def engine(tiny_models):
    with Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", dtype="float64") as llm:   # float64: batch-exact
        yield llm


def _follows_schema(out: dict) -> dict:
    value = json.loads(out["text"])
    assert list(value) == ["color", "ok", "count"]                # in the schema's order
    assert value["color"] in ("red", "blue", "green") and isinstance(value["ok"], bool)
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 99
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    return value


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 1.0, "seed": 4},
                                    {"temperature": 1.5, "top_p": 0.9, "seed": 5}])
def test_answers_follow_the_schema(engine, params):
    _follows_schema(engine.generate(prompt=PROMPT, sampling_params={"max_new_tokens": 48, "response_format": RF,
                                                                    **params}))


def test_batched_with_free_text_requests_that_keep_their_tokens(engine):
    free = [chat_prompt(f"Tell me about the number {i}.") for i in range(3)]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    alone = [engine.generate(prompt=p, sampling_params=params)["output_ids"] for p in free]
    outs = engine.generate(prompt=[*free, PROMPT, PROMPT],
                           sampling_params=[params] * 3 + [{"max_new_tokens": 48, "response_format": RF,
                                                            "temperature": t, "seed": 1} for t in (0, 1.0)])
    assert [o["output_ids"] for o in outs[:3]] == alone
    for out in outs[3:]:
        _follows_schema(out)


def test_json_object_is_an_object(engine):
    out = engine.generate(prompt=PROMPT, sampling_params={"max_new_tokens": 48, "temperature": 0,
                                                          "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(out["text"]), dict)


@pytest.mark.parametrize("rf, text", [({"type": "xml"}, "not one of"),
                                      ({"type": "json_schema", "json_schema": {}}, "JSON Schema object"),
                                      ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
                                       "cannot be used")])
def test_bad_response_formats_are_refused(engine, rf, text):
    with pytest.raises((SamplingParamError, InputError), match=text):
        engine.generate(prompt=PROMPT, sampling_params={"response_format": rf})


def test_min_tokens_does_not_outlast_a_complete_value(engine):
    """A complete JSON value allows only a stop token: min_tokens cannot push the answer past it."""
    done = engine.generate(prompt=PROMPT, sampling_params={"max_new_tokens": 64, "temperature": 0,
                                                           "response_format": RF})
    n = len(done["output_ids"])                                # the value, then a stop token
    out = engine.generate(prompt=PROMPT, sampling_params={"max_new_tokens": 64, "temperature": 0,
                                                          "min_new_tokens": n + 5, "response_format": RF})
    assert out["output_ids"] == done["output_ids"]
    _follows_schema(out)
