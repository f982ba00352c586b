"""Faults in the disaggregated path: each ends with the request failed by a clear error naming the
stage and the node, within a bounded time, and every surviving node's page pool intact (the KV
hand-over cases for Llama-3.2-Vision too, whose hand-over carries its image rows).

To hit the window deterministically, the node upstream of the victim is frozen with SIGSTOP
while the request is dispatched, the victim is SIGKILLed, and the frozen node is resumed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from disagg_support import disagg_cluster
from support import IMAGE, chat_prompt, family_prompt, noise_image

TTL = ["--heartbeat-ttl", "2", "--kv-timeout", "30"]
PROMPT = chat_prompt(IMAGE, "Describe this picture.")
BOUND_S = 15.0


@pytest.fixture(scope="module")
def harness(tiny_models, tmp_path_factory):
    roles = {"encoder": [[]], "prefill": [[]], "decode": [[]]}
    with disagg_cluster(tiny_models["qwen2_vl"], str(tmp_path_factory.mktemp("logs")), roles, TTL) as h:
        h.prompt = PROMPT
        yield h


@pytest.fixture(scope="module")
def mllama_harness(tiny_models, tmp_path_factory):
    """Llama-3.2-Vision: its hand-over carries the image rows' K/V too."""
    from transformers import AutoTokenizer

    path = tiny_models["mllama"]
    roles = {"encoder": [[]], "prefill": [[]], "decode": [[]]}
    with disagg_cluster(path, str(tmp_path_factory.mktemp("logs")), roles, TTL) as h:
        h.prompt = family_prompt(AutoTokenizer.from_pretrained(path), IMAGE, "Describe this picture.")
        yield h


def _family(request, family: str):
    return request.getfixturevalue("harness" if family == "qwen2_vl" else "mllama_harness")


def _signal(node, sig):
    os.killpg(node.proc.pid, sig)


def _replace(harness, victim):
    harness.wait_gone(victim)
    fresh = harness.cluster.add(victim.role, TTL)
    harness.cluster.wait_ready([fresh])
    harness.run(asyncio.sleep(0.5))


def _fault(harness, freeze, victim, wait_on, queue, images=True):
    """Freeze `freeze`, start a request, wait until `wait_on` holds it in `queue`, SIGKILL `victim`,
    resume `freeze`; returns the request's result."""
    req = harness.request(harness.prompt, [noise_image(120, 80)] if images else [], max_new_tokens=8)
    _signal(freeze, signal.SIGSTOP)

    async def scenario():
        task = asyncio.ensure_future(harness.consume(req))
        await harness.until_queued(wait_on, queue)
        _signal(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _signal(freeze, signal.SIGCONT)
        result = await task
        return result, time.monotonic() - killed_at

    try:
        return harness.run(scenario())
    finally:
        if freeze.alive():
            _signal(freeze, signal.SIGCONT)


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_decode_killed_while_prefill_transfers(request, family):
    harness = _family(request, family)
    prefill, decode = harness.node("prefill"), harness.node("decode")
    result, elapsed = _fault(harness, freeze=prefill, victim=decode, wait_on=decode, queue="awaiting_kv")
    assert decode.node_id in result.error and ("transfer" in result.error or "decode" in result.error)
    assert elapsed < BOUND_S
    _replace(harness, decode)
    harness.assert_pools_intact()
    assert not harness.generate(harness.prompt, [noise_image(120, 80)], max_new_tokens=4).error


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_prefill_killed_while_decode_waits_for_kv(request, family):
    harness = _family(request, family)
    prefill, decode = harness.node("prefill"), harness.node("decode")
    result, elapsed = _fault(harness, freeze=prefill, victim=prefill, wait_on=decode, queue="awaiting_kv")
    # decode expects the KV from that node only: its connection ending fails the hand-over at once
    assert ("stage 'prefill'" in result.error or "stage 'transfer'" in result.error) and prefill.node_id in result.error
    assert elapsed < BOUND_S
    _replace(harness, prefill)
    harness.assert_pools_intact()
    assert not harness.generate(harness.prompt, [noise_image(120, 80)], max_new_tokens=4).error


def test_encoder_killed_before_sending(harness):
    encoder, prefill = harness.node("encoder"), harness.node("prefill")
    result, elapsed = _fault(harness, freeze=encoder, victim=encoder, wait_on=prefill,
                             queue="awaiting_embeddings")
    assert "stage 'encode'" in result.error and encoder.node_id in result.error
    assert elapsed < BOUND_S
    _replace(harness, encoder)
    harness.assert_pools_intact()
    assert not harness.generate(PROMPT, [noise_image(120, 80)], max_new_tokens=4).error


def test_router_cancel_mid_decode_frees_pages(harness):
    req = harness.request(chat_prompt("Tell me a very long story."), max_new_tokens=3000, ignore_eos=True)
    result = harness.run(harness.consume(req, stop_after=5))
    assert len(result.token_ids) == 5 and not result.error
    harness.assert_pools_intact()


def test_layout_mismatch_is_refused_naming_the_field(harness, tmp_path):
    from epd.models.tiny_model import write_tiny_model

    other = write_tiny_model("qwen2_vl", str(tmp_path / "kv4"), overrides={"num_key_value_heads": 4})
    decode = harness.node("decode")
    harness.cluster.kill(decode)
    harness.wait_gone(decode)
    odd = harness.cluster.add("decode", TTL, model=other)
    harness.cluster.wait_ready([odd])
    harness.run(asyncio.sleep(0.6))
    result = harness.generate(chat_prompt("hello"), max_new_tokens=4)
    assert "num_kv_heads" in result.error and "prefill=2" in result.error and "decode=4" in result.error
    harness.assert_pools_intact()
