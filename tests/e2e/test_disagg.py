"""Disaggregated encode / prefill / decode: real processes, real Redis, real UCX over TCP.

Greedy tokens through the node pools equal transformers and the colocated Engine. Nodes run in
float64 (the references too): with float32, batching legitimately flips genuine 1-ULP logit
ties, which would make the 16-concurrent comparison depend on luck, not on correctness.
Prefill pages hold 4 tokens and decode pages 16, so every case also checks that the
token-major wire format makes page sizes independent.
"""

from __future__ import annotations

import asyncio

import pytest
from disagg_support import disagg_cluster
from support import IMAGE, chat_prompt, hf_generate, noise_image

from epd import Engine
from kv_transfer.sessions import SessionStore

LONG = " ".join(f"word{i} and the picture of color {i % 7}" for i in range(60))
CASES = {
    "text_only": (chat_prompt("Hello, tell me a story about a red cat."), []),
    "one_image": (chat_prompt(IMAGE, "Describe this picture."), [(120, 80)]),
    "two_images": (chat_prompt(IMAGE, IMAGE, "Compare them."), [(64, 200), (300, 90)]),
    "interleaved": (chat_prompt("First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(90, 90), (140, 56)]),
    "long_multi_chunk": (chat_prompt(LONG, IMAGE, "Summarise."), [(200, 150)]),
}
MAX_NEW = 10
COMMON = ["--dtype", "float64", "--heartbeat-ttl", "2", "--max-step-tokens", "64", "--layer-group-size", "2"]


def _images(sizes, offset=0):
    return [noise_image(w, h, seed=offset + i) for i, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module")
def harness(tiny_models, tmp_path_factory):
    roles = {"encoder": [[]], "prefill": [["--page-size", "4"]], "decode": [["--page-size", "16"]]}
    with disagg_cluster(tiny_models["qwen2_5_vl"], str(tmp_path_factory.mktemp("logs")), roles, COMMON) as h:
        yield h


@pytest.fixture(scope="module")
def engine(tiny_models):
    with Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", dtype="float64") as llm:
        yield llm


@pytest.mark.parametrize("case", list(CASES))
def test_disaggregated_greedy_equals_transformers_and_engine(harness, engine, case):
    prompt, sizes = CASES[case]
    images = _images(sizes)
    got = harness.generate(prompt, images, max_new_tokens=MAX_NEW)
    assert not got.error, got.error
    colocated = engine.generate(prompt=prompt, image_data=images or None,
                                sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW})
    ids = engine.core.inputs.process(prompt=prompt, image_data=images).input_ids
    import torch

    reference = hf_generate(engine.core.model_config.model_path, ids, images, MAX_NEW, dtype=torch.float64)
    assert got.token_ids == reference
    assert got.token_ids == colocated["output_ids"]
    assert got.text == colocated["text"]
    assert got.finish_reason == "length"
    assert {"prefill_ms", "transfer_ms", "decode_ms"} <= set(got.timings)
    # the request's timeline across processes, in ms after the router received it, in causal order
    chain = (["encoder_received_at_ms", "encoded_at_ms", "embeddings_landed_at_ms", "embeddings_taken_at_ms"]
             if images else []) + ["prefill_started_at_ms", "first_token_sampled_at_ms", "kv_meta_landed_at_ms",
                                   "kv_landed_at_ms", "first_token_at_ms"]
    timeline = {k: got.timings[k] for k in chain}
    instants = list(timeline.values())
    assert instants[0] > 0 and all(a <= b + 0.1 for a, b in zip(instants, instants[1:], strict=False)), timeline
    harness.assert_pools_intact()


def test_sixteen_concurrent_requests_over_two_prefill_and_two_decode_nodes(harness, engine):
    """Nodes that join are used within seconds; all 16 requests are right; both P and both D serve."""
    new = [harness.cluster.add("prefill", ["--page-size", "8"]), harness.cluster.add("decode", ["--page-size", "16"])]
    harness.cluster.wait_ready(new)
    cases = [CASES[name] for name in CASES] * 4
    requests, expected = [], []
    for i, (prompt, sizes) in enumerate(cases[:16]):
        images = _images(sizes, offset=i)
        n = 4 + i % 5
        requests.append(harness.request(prompt, images, max_new_tokens=n))
        expected.append(engine.generate(prompt=prompt, image_data=images or None,
                                        sampling_params={"temperature": 0, "max_new_tokens": n})["output_ids"])

    async def all_at_once():
        await asyncio.sleep(1.0)  # one pool refresh so the new nodes are seen
        return await asyncio.gather(*(harness.consume(r) for r in requests))

    results = harness.run(all_at_once())
    assert [r.error for r in results] == [""] * 16
    assert [r.token_ids for r in results] == expected
    sessions = SessionStore(harness.backend.redis)
    used = {role: {sessions.get(r.rid).nodes[role] for r in requests} for role in ("prefill", "decode")}
    assert len(used["prefill"]) == 2 and len(used["decode"]) == 2, used
    harness.assert_pools_intact()
