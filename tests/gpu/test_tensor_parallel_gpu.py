"""Tensor parallelism on two GPUs (skipped with fewer): in bf16 with flashinfer and CUDA graphs on
every rank (NCCL collectives captured inside), a 2-GPU engine gives the 1-GPU engine's logits at
every step of forced-token runs (text and an image, prefill and graph-replayed decode), for
Qwen2.5-VL, Llama 4 (experts placed one half per GPU, the split-KV graphs) and Llama-3.2-Vision
(the cross-attention graph kernel); the leader's graphs replayed."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_steps_close, forced_logits
from support import IMAGE, family_prompt, noise_image

from epd import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                  reason="needs two GPUs")]
KV = 16384


def _run(path: str, tp: int) -> tuple[list[torch.Tensor], int]:
    with Engine(model_path=path, dtype="bfloat16", page_size=16, kv_cache_tokens=KV, tensor_parallel_size=tp) as llm:
        core = llm.core
        prompts = [family_prompt(llm.tokenizer, "Tell me a long story about a red cat and a lighthouse."),
                   family_prompt(llm.tokenizer, IMAGE, "Describe this picture.")]
        inputs = [core.inputs.process(prompt=prompts[0]),
                  core.inputs.process(prompt=prompts[1], image_data=[noise_image(120, 80, seed=1)])]
        forced = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]]
        steps = forced_logits(core, inputs, forced)
        replays = core.runner.graphs.replays if core.runner.graphs is not None else 0
    return steps, replays


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llama4", "mllama"])
def test_two_gpus_give_one_gpu_logits_with_graphs(tiny_models, arch):
    one, _ = _run(tiny_models[arch], 1)
    two, replays = _run(tiny_models[arch], 2)
    assert replays > 0, "decode steps replayed the captured graphs on the leader"
    assert_steps_close(two, one, f" ({arch}, 2 GPUs against 1)")


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llama4"])
def test_two_gpu_prefill_and_decode_nodes_hand_over_rank_by_rank(tiny_models, tmp_path, arch):
    """1E + a prefill node of 2 GPUs + a decode node of 2 GPUs (GPUs 2-3 when there are 4, else the
    same two): each rank's KV heads go straight to the decode node's same rank (UCX between GPUs),
    and the float32 tokens equal one GPU's colocated engine."""
    import glob
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from disagg_support import disagg_cluster

    path = tiny_models[arch]
    decode_gpu = 2 if torch.cuda.device_count() >= 4 else 0
    roles = {"encoder": [[]], "prefill": [["-tp", "2", "--device", "cuda:0"]],
             "decode": [["-tp", "2", "--device", f"cuda:{decode_gpu}"]]}
    common = ["--dtype", "float32", "--heartbeat-ttl", "2", "--kv-cache-tokens", str(KV)]
    greedy = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    with Engine(model_path=path, device="cuda", dtype="float32") as llm:
        prompts = [family_prompt(llm.tokenizer, "Tell me a long story about a red cat and a lighthouse."),
                   family_prompt(llm.tokenizer, IMAGE, "Describe this picture.")]
        images = [None, [noise_image(120, 80, seed=1)]]
        want = [llm.generate(prompt=p, image_data=im, sampling_params=greedy)["output_ids"]
                for p, im in zip(prompts, images, strict=True)]
    torch.cuda.empty_cache()
    with disagg_cluster(path, str(tmp_path), roles, common, device="cuda") as h:
        for prompt, imgs, tokens in zip(prompts, images, want, strict=True):
            got = h.generate(prompt, imgs or [], max_new_tokens=12, ignore_eos=True)
            assert not got.error, got.error
            assert got.token_ids == tokens
        h.assert_pools_intact()
    logs = "".join(open(p).read() for p in glob.glob(str(tmp_path / "prefill-*.log")))
    assert "rank by rank (2 ranks)" in logs and "rank 1: KV of" in logs
