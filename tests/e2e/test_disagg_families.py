"""Every LLaVA variant, Llama-3.2-Vision (cross-attention: its image rows' K/V handed over with
the prompt's) and Llama 4 (MoE, chunked attention, tiled images) through 1 encoder + 1 prefill +
1 decode process (real Redis, real UCX over TCP), prefill pages of 4 tokens and decode pages of
16: greedy tokens equal transformers' (float64 on both sides) and the colocated Engine's; every
pool is intact afterwards."""

from __future__ import annotations

import re

import pytest
import torch
from disagg_support import disagg_cluster
from support import IMAGE, family_prompt, hf_generate, noise_image

from epd import Engine

COMMON = ["--dtype", "float64", "--heartbeat-ttl", "2", "--max-step-tokens", "64"]
ROLES = {"encoder": [[]], "prefill": [["--page-size", "4"]], "decode": [["--page-size", "16"]]}
CASES = [(("Hello, tell me a story about a red cat.",), []),
         ((IMAGE, "Describe this picture."), [(120, 80)]),
         ((IMAGE, "and", IMAGE, "Compare them."), [(64, 200), (50, 50)]),
         (("First", IMAGE, "then", IMAGE, "which is bluer?"), [(300, 90), (90, 90)])]
MAX_NEW = 8


@pytest.mark.parametrize("arch", ["llava", "llava_next", "llava_onevision", "mllama", "llama4"])
def test_families_split_over_three_pools_equal_transformers(tiny_models, tmp_path, arch):
    path = tiny_models[arch]
    prompt_lens: list[int] = []
    with Engine(model_path=path, device="cpu", dtype="float64") as engine, \
            disagg_cluster(path, str(tmp_path), ROLES, COMMON) as harness:
        for parts, sizes in CASES:
            images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
            prompt = family_prompt(engine.tokenizer, *parts)
            got = harness.generate(prompt, images, max_new_tokens=MAX_NEW, ignore_eos=True)
            assert not got.error, got.error
            ids = engine.core.inputs.process(prompt=prompt, image_data=images).input_ids
            assert got.token_ids == hf_generate(path, ids, images, MAX_NEW, dtype=torch.float64)
            colocated = engine.generate(prompt=prompt, image_data=images or None,
                                        sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW,
                                                         "ignore_eos": True})
            assert got.token_ids == colocated["output_ids"] and got.text == colocated["text"]
            prompt_lens.append(len(ids))
        harness.assert_pools_intact()
        if arch == "llama4":
            _chunked_layers_handed_over_their_last_chunk_only(engine, tmp_path, prompt_lens)


def _chunked_layers_handed_over_their_last_chunk_only(engine: Engine, log_dir, prompt_lens: list[int]) -> None:
    """The prefill node's log of each hand-over: the bytes of every full-attention layer's prompt
    KV, and of each chunked layer's tokens from the chunk the first generated token falls in."""
    _, _, _, heads, dim = engine.core.kv.layers[0].shape
    per_token = 2 * heads * dim * 8   # K and V, float64
    chunks = engine.core.model.attention_chunks
    assert any(chunks) and not all(chunks)
    expected = sorted(per_token * sum(n - (min(n // c * c, n - 1) if c else 0) for c in chunks) for n in prompt_lens)
    text = "".join(p.read_text() for p in sorted(log_dir.glob("prefill*.log")))
    logged = sorted(int(b) for b in re.findall(r"KV of \S+: (\d+) bytes handed", text))
    assert logged == expected
    assert all(b < per_token * len(chunks) * n for b, n in zip(expected, sorted(prompt_lens), strict=True))
