"""The colocated pool, cache-aware routing and backpressure: real node processes, a real Redis.

- A pool of two colocated nodes (each encodes, prefills and decodes) behind the router serves
  greedy output equal to transformers, 16 requests at once spread over both, pools intact after.
- Cache-aware routing: a prompt sent again goes to the node holding its prefix (its prompt comes
  from that node's prefix cache, as usage's cached tokens say); an image sent again goes to the
  encoder that has its embeddings (the encoders' cache hits in the router's /metrics gauges).
- A mixed deployment: text-only requests go to the colocated node, requests with images to the
  split pools.
- Backpressure: with a TTFT target, a burst far beyond what the nodes get through is partly refused
  (429 with Retry-After) instead of queued; once it has passed, every request is served.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from disagg_support import disagg_cluster
from support import IMAGE, chat_prompt, hf_generate, noise_image

from epd.config import ModelConfig, load_tokenizer
from epd.engine.inputs import InputProcessor
from kv_transfer.auth import ClusterSecret
from kv_transfer.sessions import SessionStore
from router.backend import BackendError
from router.pipeline import DisaggBackend

COMMON = ["--dtype", "float64", "--heartbeat-ttl", "2", "--max-step-tokens", "64", "--page-size", "4"]
STORY = " ".join(f"sentence {i} of a long story about a lighthouse keeper and the sea." for i in range(12))
CASES = [
    (chat_prompt("Hello, tell me a story about a red cat."), []),
    (chat_prompt(IMAGE, "Describe this picture."), [(120, 80)]),
    (chat_prompt("First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(90, 90), (140, 56)]),
    (chat_prompt(STORY, IMAGE, "Summarise."), [(200, 150)]),
]


def _reference(model: str, prompt: str, images, max_new: int) -> list[int]:
    config = ModelConfig.from_pretrained(model)
    ids = InputProcessor(config, load_tokenizer(model), 1 << 20).process(prompt=prompt, image_data=images).input_ids
    return hf_generate(model, ids, images, max_new, dtype=torch.float64)


@pytest.fixture(scope="module")
def pool(tiny_models, tmp_path_factory):
    roles = {"colocated": [[], []]}
    with disagg_cluster(tiny_models["qwen2_5_vl"], str(tmp_path_factory.mktemp("logs")), roles, COMMON) as h:
        yield h


def test_a_colocated_pool_of_two_serves_transformers_greedy_output(pool, tiny_models):
    model = tiny_models["qwen2_5_vl"]
    cases = [(prompt, [noise_image(w, h, seed=10 * i + j) for j, (w, h) in enumerate(sizes)], 4 + i % 5)
             for i, (prompt, sizes) in enumerate(CASES * 4)]
    expected = [_reference(model, prompt, images, n) for prompt, images, n in cases]
    requests = [pool.request(prompt, images, max_new_tokens=n) for prompt, images, n in cases]
    results = pool.run(_all(pool.consume(r) for r in requests))
    assert [r.error for r in results] == [""] * len(cases)
    assert [r.token_ids for r in results] == expected
    sessions = SessionStore(pool.backend.redis)
    used = {sessions.get(r.rid).nodes["colocated"] for r in requests}
    assert len(used) == 2, "both colocated nodes serve"
    assert {"queue_ms", "prefill_ms", "decode_ms"} <= set(results[-1].timings)
    pool.assert_pools_intact()


def test_a_prompt_sent_again_goes_where_its_prefix_is_cached(pool):
    prompt = chat_prompt(STORY, "What happens next?")
    first = pool.generate(prompt, max_new_tokens=3)
    again = [pool.request(prompt, max_new_tokens=3) for _ in range(3)]
    results = [pool.run(pool.consume(r)) for r in again]
    assert [r.token_ids for r in results] == [first.token_ids] * 3
    sessions = SessionStore(pool.backend.redis)
    assert len({sessions.get(r.rid).nodes["colocated"] for r in again}) == 1
    cached = [pool.run(_cached_tokens(pool.backend, pool.request(prompt, max_new_tokens=2)))]
    assert cached[0] >= len(STORY) // 8, "the repeat's prompt came from the prefix cache"
    assert pool.backend.pool.affinity_picks["colocated"] >= 3


async def _all(coros):
    return await asyncio.gather(*coros)


async def _cached_tokens(backend: DisaggBackend, req) -> int:
    cached = 0
    async for ev in backend.generate(req):
        cached = ev.cached_tokens
    return cached


def test_backpressure_refuses_part_of_a_burst_then_serves_everything(pool):
    secret = ClusterSecret.load(pool.cluster.secret_file)
    backend = DisaggBackend(pool.cluster.model, pool.cluster.redis_url, secret, refresh_s=0.25)
    long = chat_prompt(STORY * 3, "Go on.")

    async def scenario():
        await backend.start()
        for _ in range(4):   # the nodes measure what they get through
            await _drain(backend, pool.request(long, max_new_tokens=1))
        await asyncio.sleep(0.6)   # and report it
        rate = min(s.rates["prompt_tokens"] for s in backend.pool.reports.values())
        one_prompt_s = len(long) / 4 / rate   # about a request's own prefill
        backend.ttft_target_s = 6 * one_prompt_s   # a few requests' queue per node
        burst = await asyncio.gather(*(_outcome(backend, pool.request(long + str(i), max_new_tokens=2))
                                       for i in range(48)))
        await asyncio.sleep(1.0)
        after = [await _outcome(backend, pool.request(long + f"after {i}", max_new_tokens=2)) for i in range(4)]
        await backend.close()
        return burst, after

    burst, after = pool.run(scenario())
    refused = [o for o in burst if isinstance(o, BackendError)]
    assert refused, "a burst beyond the target is partly refused"
    assert all(e.status == 429 and e.retry_after and e.retry_after >= 1 for e in refused)
    assert "ms target" in str(refused[0])
    assert len(refused) < len(burst), "what fits the target is served"
    assert all(not isinstance(o, BackendError) for o in after), after
    pool.assert_pools_intact()


async def _drain(backend: DisaggBackend, req) -> None:
    async for _ in backend.generate(req):
        pass


async def _outcome(backend: DisaggBackend, req):
    try:
        await _drain(backend, req)
        return "ok"
    except BackendError as e:
        return e


@pytest.fixture(scope="module")
def mixed(tiny_models, tmp_path_factory):
    roles = {"encoder": [[], []], "prefill": [[]], "decode": [[]], "colocated": [[]]}
    with disagg_cluster(tiny_models["qwen2_5_vl"], str(tmp_path_factory.mktemp("logs")), roles, COMMON) as h:
        yield h


def test_mixed_pools_text_to_colocated_images_split_and_image_affinity(mixed):
    sessions = SessionStore(mixed.backend.redis)
    text = mixed.request(chat_prompt("Hello there."), max_new_tokens=3)
    assert not mixed.run(mixed.consume(text)).error
    assert set(sessions.get(text.rid).nodes) == {"colocated"}
    image = noise_image(160, 120, seed=7)
    with_image = [mixed.request(chat_prompt(IMAGE, f"Describe it, take {i}."), [image], max_new_tokens=3)
                  for i in range(4)]
    results = [mixed.run(mixed.consume(r)) for r in with_image]
    assert [r.error for r in results] == [""] * 4
    assert {tuple(sorted(sessions.get(r.rid).nodes)) for r in with_image} == {("decode", "encoder", "prefill")}
    assert len({sessions.get(r.rid).nodes["encoder"] for r in with_image}) == 1, "one image, one encoder"
    mixed.run(asyncio.sleep(0.6))   # the next status poll
    stats = mixed.backend.stats()
    assert stats["encoder_cache_hits_total"] >= 3 and stats["encoder_cache_queries_total"] >= 4
    mixed.assert_pools_intact()


def _truncated_jpeg_uri() -> str:
    """A JPEG whose header is whole (the router reads its size from it) and whose pixels are cut."""
    import base64
    import io

    buf = io.BytesIO()
    noise_image(200, 120, seed=3).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()[:700]).decode()


async def _error(backend: DisaggBackend, req) -> BackendError | None:
    outcome = await _outcome(backend, req)
    return outcome if isinstance(outcome, BackendError) else None


@pytest.mark.parametrize("cluster", ["mixed", "pool"])
def test_an_image_that_does_not_decode_on_the_node_is_the_client_s_400(cluster, request):
    """The router reads only an image's header; the node decodes it (an encoder of the split pools,
    or a colocated node). A cut JPEG fails there: the client gets a 400 naming the image, no node is
    blamed, and the next request is served."""
    h = request.getfixturevalue(cluster)
    req = h.request(chat_prompt(IMAGE, "Describe it."), [_truncated_jpeg_uri()], max_new_tokens=3)
    error = h.run(_error(h.backend, req))
    assert error is not None and error.status == 400 and error.failed_node == ""
    assert "image" in str(error) and ("truncated" in str(error).lower() or "decode" in str(error).lower()), error
    node_role = "encoder" if cluster == "mixed" else "colocated"
    assert node_role in SessionStore(h.backend.redis).get(req.rid).nodes
    ok = h.generate(chat_prompt(IMAGE, "And this one?"), [noise_image(64, 64, seed=5)], max_new_tokens=3)
    assert not ok.error and len(ok.token_ids) == 3
    h.assert_pools_intact()
