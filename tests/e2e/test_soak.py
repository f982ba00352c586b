"""A 3-minute soak: 32 streams with images, one request after another each, through 1 encoder +
1 prefill + 2 decode processes. No request fails, every answer to the same prompt is the same, and
no node's memory is still growing at the end (resident memory over the last minute against the
minute before), every pool intact afterwards."""

from __future__ import annotations

import asyncio
import time

from disagg_support import disagg_cluster
from support import IMAGE, chat_prompt, noise_image

SOAK_S = 180.0
STREAMS = 32
TTL = ["--heartbeat-ttl", "2", "--kv-timeout", "60"]
PROMPTS = [(chat_prompt(IMAGE, f"Describe picture {i}."), [noise_image(96, 64, seed=i)]) for i in range(8)]
GROWTH_MB = 8.0    # more over the last minute would be a leak (measured: under 1 MB a minute)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_soak_of_32_streams_with_images(tiny_models, tmp_path):
    roles = {"encoder": [[]], "prefill": [[]], "decode": [[], []]}
    with disagg_cluster(tiny_models["qwen2_vl"], str(tmp_path), roles, TTL) as harness:
        samples: list[tuple[float, dict[str, float]]] = []
        answers: dict[int, set[tuple[int, ...]]] = {}
        errors: list[str] = []
        start = time.monotonic()

        async def stream(k: int) -> int:
            done = 0
            while time.monotonic() - start < SOAK_S:
                which = (k + done) % len(PROMPTS)
                prompt, images = PROMPTS[which]
                result = await harness.consume(harness.request(prompt, images, max_new_tokens=6, ignore_eos=True))
                if result.error:
                    errors.append(result.error)
                answers.setdefault(which, set()).add(tuple(result.token_ids))
                done += 1
            return done

        async def sample() -> None:
            while time.monotonic() - start < SOAK_S:
                samples.append((time.monotonic() - start,
                                {n.node_id: _rss_mb(n.proc.pid) for n in harness.cluster.nodes}))
                await asyncio.sleep(5.0)

        async def soak() -> list[int]:
            sampler = asyncio.ensure_future(sample())
            counts = await asyncio.gather(*(stream(k) for k in range(STREAMS)))
            await sampler
            return counts

        counts = harness.run(soak())
        assert not errors, errors[:3]
        assert sum(counts) > STREAMS and all(len(outs) == 1 for outs in answers.values())
        for node_id in samples[0][1]:
            minute = [rss[node_id] for at, rss in samples if SOAK_S - 120 <= at < SOAK_S - 60]
            last = [rss[node_id] for at, rss in samples if at >= SOAK_S - 60]
            grown_before, grown_last = minute[-1] - minute[0], last[-1] - last[0]
            print(f"{node_id}: {samples[0][1][node_id]:.0f} -> {samples[-1][1][node_id]:.0f} MB "
                  f"(+{grown_before:.1f} MB, then +{grown_last:.1f} MB a minute)")
            assert grown_last < GROWTH_MB, f"{node_id} still grows: +{grown_last:.1f} MB over the last minute"
        harness.assert_pools_intact()
