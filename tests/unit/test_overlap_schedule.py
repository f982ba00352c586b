"""The overlap schedule: a greedy step is launched before the step before it has handed its tokens
to the host. What a user sees must not change: the same tokens, finish reasons and counts as the
synchronous engine, no forward past max_new_tokens, and no KV page handed back while a step that
was launched before the request ended can still write into it."""

from __future__ import annotations

import pytest
import torch
from support import chat_prompt

from epd import Engine
from epd.engine.engine_core import EngineCore
from epd.engine.sampling import SamplingParams, SamplingRow, sample, sample_on_device

PROMPTS = [chat_prompt(f"Request {i}: tell me about the {c} dog.")
           for i, c in enumerate(["red", "blue", "green", "tan"])]


@pytest.fixture(scope="module")
def engines(tiny_models):
    """float64 (see test_engine_correctness): one engine with the overlap schedule, one without."""
    path = tiny_models["qwen2_5_vl"]
    overlap = Engine(model_path=path, device="cpu", dtype="float64", page_size=4)
    sync = Engine(model_path=path, device="cpu", dtype="float64", page_size=4, disable_overlap_schedule=True)
    yield overlap, sync
    for llm in (overlap, sync):
        llm.check_integrity()
        assert llm.core.kv.pool.num_in_use == 0
        llm.shutdown()


def _forwards(engine: Engine) -> list[int]:
    """Count the model forwards the engine runs from now on (one entry per forward: its batch size)."""
    calls: list[int] = []
    run = engine.core.runner.run

    def counted(chunks, *a, **k):
        calls.append(len(chunks))
        return run(chunks, *a, **k)

    engine.core.runner.run = counted
    return calls


def _request(core: EngineCore, prompt: str, **params):
    inp = core.inputs.process(prompt=prompt)
    req = core.new_request(inp, SamplingParams.from_dict({"temperature": 0, **params}))
    core.add(req)
    return req


def _through_schedule(core: EngineCore, req) -> list[int]:
    """Step until `req` ends, checking that every step left its tokens on the device; its tokens."""
    tokens = []
    while req.status.value != "finished":
        tokens += [ev.token_id for ev in core.step() if ev.rid == req.rid]
        assert core.busy or req.status.value == "finished", "the step's tokens should stay on the device"
    core.flush()
    return tokens


def test_a_mixed_batch_equals_the_synchronous_engine(engines):
    overlap, sync = engines
    solo = sync.generate(prompt=PROMPTS[0], sampling_params={"temperature": 0, "max_new_tokens": 12})["output_ids"]
    params = [
        {"temperature": 0, "max_new_tokens": 12},
        {"temperature": 0, "max_new_tokens": 12, "stop_token_ids": [solo[3]]},   # stops early, mid-batch
        {"temperature": 0.8, "seed": 3, "max_new_tokens": 9},                   # sampled on the host
        {"temperature": 0, "max_new_tokens": 5, "logprobs": True, "top_logprobs": 2},
    ]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    want = sync.generate(prompt=prompts, sampling_params=params)
    got = overlap.generate(prompt=prompts, sampling_params=params)
    for g, w in zip(got, want, strict=True):
        assert g["output_ids"] == w["output_ids"]
        assert g["text"] == w["text"]
        assert g["meta_info"]["finish_reason"] == w["meta_info"]["finish_reason"]
        assert g["meta_info"]["completion_tokens"] == len(w["output_ids"])
        assert g["meta_info"]["output_token_logprobs"] == pytest.approx(w["meta_info"]["output_token_logprobs"])
    assert got[0]["output_ids"] == solo
    assert got[1]["output_ids"] == solo[:4]


def test_greedy_steps_are_launched_before_the_last_tokens_are_read(engines):
    overlap, _ = engines
    core = overlap.core
    req = _request(core, PROMPTS[1], max_new_tokens=6)
    seen = []
    while not (events := core.step()) or not events[-1].finished:
        seen += events
        assert core.busy, "every greedy step leaves its tokens in flight"
        assert req.output_ids[-1] < 0, "the next step reads the last token on the device"
    seen += events
    assert [e.completion_tokens for e in seen] == [1, 2, 3, 4, 5, 6]
    assert req.output_ids == [e.token_id for e in seen] and min(req.output_ids) >= 0
    core.flush()


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_no_forward_runs_past_max_new_tokens(engines, max_new_tokens):
    overlap, sync = engines
    counts = []
    for llm in (overlap, sync):
        calls = _forwards(llm)
        try:
            out = llm.generate(prompt=PROMPTS[2], sampling_params={"temperature": 0, "max_new_tokens": max_new_tokens})
        finally:
            del llm.core.runner.run
        assert len(out["output_ids"]) == max_new_tokens
        counts.append(len(calls))
    assert counts == [max_new_tokens, max_new_tokens]   # the prefill, then one decode per further token


def test_pages_of_a_stopped_request_wait_for_the_step_in_flight(engines):
    """A request that stops on a token the host reads only after the next step was launched: that
    step still writes into its pages, so they stay out of the pool until it has run."""
    overlap, sync = engines
    ids = sync.generate(prompt=PROMPTS[3], sampling_params={"temperature": 0, "max_new_tokens": 8})["output_ids"]
    core = overlap.core
    req = _request(core, PROMPTS[3], max_new_tokens=8, stop_token_ids=[ids[2]])
    pages = None
    while True:
        pages = list(req.pages) or pages
        events = core.step()
        if events and events[-1].finished:
            break
    assert req.output_ids == ids[:3]
    fenced = core.scheduler.fence
    assert core.busy and not req.pages and set(pages) <= set(fenced)   # and the page the last step grew
    assert core.kv.pool.num_in_use == len(fenced)
    core.check_integrity()
    assert core.step() == []   # the step launched before the stop was seen: nothing of it is kept
    assert not core.busy and core.kv.pool.num_in_use == 0


def test_abort_with_a_step_in_flight_keeps_real_tokens_and_frees_pages(engines):
    overlap, sync = engines
    want = sync.generate(prompt=PROMPTS[0], sampling_params={"temperature": 0, "max_new_tokens": 10})["output_ids"]
    core = overlap.core
    keep = _request(core, PROMPTS[0], max_new_tokens=10)
    drop = _request(core, PROMPTS[1], max_new_tokens=10)
    tokens = {keep.rid: [], drop.rid: []}
    for _ in range(4):
        for ev in core.step():
            tokens[ev.rid].append(ev.token_id)
    assert core.busy
    assert core.abort(drop.rid)
    assert drop.output_ids == tokens[drop.rid], "no placeholder is left in an aborted request"
    core.check_integrity()
    while keep.status.value != "finished":
        for ev in core.step():
            assert ev.rid == keep.rid
            tokens[keep.rid].append(ev.token_id)
    core.flush()
    assert tokens[keep.rid] == want
    assert core.kv.pool.num_in_use == 0


@pytest.mark.parametrize("params", [{"temperature": 5.0, "top_p": 1e-6}, {"temperature": 5.0, "min_p": 1.0}])
def test_unseeded_draws_are_sampled_ahead_on_the_device(engines, params):
    """Filters that leave one token make an unseeded draw deterministic: it must equal greedy, and
    run through the overlap schedule (sampled on the device, read a step later)."""
    overlap, sync = engines
    greedy = sync.generate(prompt=PROMPTS[1], sampling_params={"temperature": 0, "max_new_tokens": 8})["output_ids"]
    core = overlap.core
    req = _request(core, PROMPTS[1], max_new_tokens=8, **params)
    assert not req.params.greedy
    assert _through_schedule(core, req) == greedy


def test_seeded_draws_go_through_the_schedule_and_equal_the_synchronous_engine(engines):
    overlap, sync = engines
    params = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_new_tokens": 10}
    want = sync.generate(prompt=PROMPTS[0], sampling_params=params)["output_ids"]
    core = overlap.core
    req = _request(core, PROMPTS[0], **params)
    assert _through_schedule(core, req) == want
    assert want != sync.generate(prompt=PROMPTS[0], sampling_params={**params, "seed": 12})["output_ids"]


def test_logprobs_come_through_the_schedule_as_the_synchronous_engine_gives_them(engines):
    params = {"temperature": 0, "max_new_tokens": 6, "logprobs": True, "top_logprobs": 3}
    got = {}
    for name, llm in zip(("overlap", "sync"), engines, strict=True):
        core = llm.core
        req = _request(core, PROMPTS[3], **params)
        events, deferred = [], False
        while req.status.value != "finished":
            events += core.step()
            deferred |= core.busy
        core.flush()
        got[name] = ([(e.token_id, e.logprob, e.top_logprobs) for e in events], deferred, list(req.output_logprobs))
    (rows, deferred, lps), (want_rows, _, want_lps) = got["overlap"], got["sync"]
    assert deferred and rows == want_rows and lps == want_lps
    assert all(len(top) == 3 and top[0][0] == tok for tok, _, top in rows)   # greedy: the top-1 is the token


@pytest.mark.parametrize("params", [
    {"repetition_penalty": 1.3}, {"frequency_penalty": 0.8},
    {"presence_penalty": 2.0, "repetition_penalty": 1.5, "temperature": 0.8, "seed": 2}])
def test_penalties_read_the_token_still_on_the_device(engines, params):
    """A penalty counts every earlier token, including the one the host has not read yet (the
    step before's, `pending`): the schedule must give the synchronous engine's tokens."""
    overlap, sync = engines
    params = {"temperature": 0, "max_new_tokens": 24, **params}
    want = sync.generate(prompt=PROMPTS[2], sampling_params=params)["output_ids"]
    plain = sync.generate(prompt=PROMPTS[2], sampling_params={**params, "repetition_penalty": 1.0,
                                                             "frequency_penalty": 0.0, "presence_penalty": 0.0})
    assert want != plain["output_ids"], "the penalty must change something for this test to see it"
    core = overlap.core
    req = _request(core, PROMPTS[2], **params)
    assert _through_schedule(core, req) == want


def test_min_new_tokens_bans_stop_ids_through_the_schedule(engines):
    overlap, sync = engines
    ids = sync.generate(prompt=PROMPTS[0], sampling_params={"temperature": 0, "max_new_tokens": 10})["output_ids"]
    params = {"temperature": 0, "max_new_tokens": 10, "stop_token_ids": [ids[1]], "min_new_tokens": 5}
    want = sync.generate(prompt=PROMPTS[0], sampling_params=params)
    got = overlap.generate(prompt=PROMPTS[0], sampling_params=params)
    assert got["output_ids"] == want["output_ids"] and ids[1] not in got["output_ids"][:5]
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]


def test_a_penalised_row_sees_the_token_still_on_the_device(engines):
    """The sampler's row for a request whose last token is a placeholder carries that token as
    `pending` (read on the device), and the sampler counts it exactly as a token the host knows."""
    overlap, _ = engines
    core = overlap.core
    req = _request(core, PROMPTS[1], max_new_tokens=4, frequency_penalty=2.0)
    core.step()                                   # the prefill: its token stays on the device
    assert req.output_ids[-1] < 0
    row = core.sampling_row(req)
    core.flush()
    assert row.output_ids == [] and row.pending.tolist() == req.output_ids[-1:]
    logits = torch.zeros(1, core.model_config.text.vocab_size, dtype=torch.float64)
    logits[0, req.output_ids[-1]] = 1.0           # the argmax, unless the penalty counts it
    on_device = sample_on_device(logits, [row]).tokens.item()
    on_host = sample(logits, [SamplingRow(row.params, None, [], req.output_ids[-1:], ())]).token_ids[0]
    assert on_device == on_host != req.output_ids[-1]
    core.abort(req.rid)
