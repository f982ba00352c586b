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
