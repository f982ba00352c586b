"""LocalBackend: the engine thread, per-request queues, abort on cancel, failures, stats."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import IMAGE, chat_prompt, hf_generate, noise_image

from epd.engine.sampling import SamplingParams
from router.backend import BackendError, BackendRequest
from router.local_backend import LocalBackend


@pytest.fixture(scope="module")
def backend(tiny_models):
    b = LocalBackend(tiny_models["qwen2_vl"], device="cpu", page_size=4, max_step_tokens=64)
    yield b
    asyncio.run(b.close())
    assert not b._thread.is_alive()


def request(rid: str, prompt: str, images=(), **params) -> BackendRequest:
    return BackendRequest(rid, prompt, None, list(images), SamplingParams.from_dict({"temperature": 0, **params}))


async def collect(backend: LocalBackend, req: BackendRequest, stop_after: int | None = None) -> list:
    events = []
    agen = backend.generate(req)
    try:
        async for ev in agen:
            events.append(ev)
            if stop_after is not None and len(events) >= stop_after:
                break
    finally:
        await agen.aclose()
    return events


async def wait_idle(backend: LocalBackend, timeout: float = 5.0) -> dict[str, float]:
    """Poll from inside the consumers' event loop: once the loop is gone, the engine thread drops
    requests on its own, which would hide a missing abort."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = backend.stats()
        if stats["num_requests_running"] == 0 and stats["kv_cache_pages_in_use"] == 0:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"backend not idle after {timeout}s: {backend.stats()}")


def test_greedy_tokens_equal_transformers(backend):
    images = [noise_image(96, 72, seed=3)]
    prompt = chat_prompt(IMAGE, "Describe the picture.")
    events = asyncio.run(collect(backend, request("g1", prompt, images, max_new_tokens=8)))
    inp = backend.core.inputs.process(prompt=prompt, image_data=images)
    expected = hf_generate(backend.core.model_config.model_path, inp.input_ids, images, 8)
    assert [e.token_id for e in events] == expected
    final = events[-1]
    assert final.finished and not any(e.finished for e in events[:-1])
    assert (final.prompt_tokens, final.completion_tokens) == (len(inp.input_ids), len(expected))
    assert final.image_tokens == inp.images[0].num_tokens > 0
    assert {"queue_ms", "prefill_ms", "decode_ms", "transfer_ms"} <= set(final.timings)
    assert all(v >= 0 for v in final.timings.values())


def test_closing_or_cancelling_the_consumer_frees_pages(backend):
    long = dict(max_new_tokens=2000, ignore_eos=True)

    async def scenario() -> tuple[list, list, float, dict]:
        short_task = asyncio.ensure_future(collect(backend, request("s1", chat_prompt("short one"), max_new_tokens=6)))
        partial = await collect(backend, request("c1", chat_prompt("closed after three"), **long), stop_after=3)
        busy = backend.stats()["kv_cache_pages_in_use"]
        cancelled = asyncio.ensure_future(collect(backend, request("c2", chat_prompt("cancelled"), **long)))
        await asyncio.sleep(0.3)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        short = await short_task
        return partial, short, busy, await wait_idle(backend)

    partial, short, busy, stats = asyncio.run(scenario())
    assert len(partial) == 3 and busy > 0
    assert len(short) == 6 and short[-1].finish_reason == "length"
    assert stats["kv_cache_usage_perc"] == 0.0 and stats["num_requests_waiting"] == 0
    backend.core.check_integrity()


def test_bad_input_is_a_400_naming_the_field(backend):
    with pytest.raises(BackendError) as err:
        asyncio.run(collect(backend, request("b1", chat_prompt(IMAGE, "no image given"), max_new_tokens=4)))
    assert err.value.status == 400 and err.value.param == "image_data"
    assert "placeholder" in str(err.value)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(backend):
    real_step = backend.core.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device error")
        return real_step()

    backend.core.step = flaky_step
    try:
        with pytest.raises(BackendError) as err:
            asyncio.run(collect(backend, request("f1", chat_prompt("doomed"), max_new_tokens=50, ignore_eos=True)))
    finally:
        backend.core.step = real_step
    assert err.value.status == 500 and "simulated device error" in str(err.value)
    asyncio.run(wait_idle(backend))
    backend.core.check_integrity()
    after = asyncio.run(collect(backend, request("f2", chat_prompt("fine again"), max_new_tokens=4)))
    assert len(after) == 4 and after[-1].finished


def test_duplicate_request_ids_are_refused(backend):
    async def scenario() -> BackendError:
        first = asyncio.ensure_future(collect(backend, request("dup", chat_prompt("one"), max_new_tokens=200,
                                                               ignore_eos=True)))
        for _ in range(200):   # until the first is in the engine (its input is processed on a thread)
            if backend.stats()["num_requests_running"] >= 1:
                break
            await asyncio.sleep(0.05)
        try:
            await collect(backend, request("dup", chat_prompt("two"), max_new_tokens=4))
        except BackendError as e:
            return e
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await wait_idle(backend)
        raise AssertionError("a second request with the same id was accepted")

    err = asyncio.run(scenario())
    assert err.status == 400 and "already in flight" in str(err)
