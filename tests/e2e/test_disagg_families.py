"""Every LLaVA variant, Llama-3.2-Vision (cross-attention: its image rows' K/V handed over with
the prompt's) and Llama 4 (MoE, chunked attention, tiled images) through 1 encoder + 1 prefill +
1 decode process (real Redis, real UCX over TCP), prefill pages of 4 tokens and decode pages of
16: greedy tokens equal transformers' (float64 on both sides) and the colocated Engine's; every
pool is intact afterwards."""

from __future__ import annotations

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
        harness.assert_pools_intact()
