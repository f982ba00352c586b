"""Same-host KV hand-over through CUDA IPC: the page-copy kernel, and real prefill/decode node
processes on one GPU whose greedy tokens equal the colocated engine's and the UCX path's."""

from __future__ import annotations

import glob
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from disagg_support import disagg_cluster  # noqa: E402
from support import IMAGE, chat_prompt, noise_image  # noqa: E402

from epd import Engine  # noqa: E402
from kv_transfer.cuda_ipc import copy_pages  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_pages_moves_exactly_the_listed_pages(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    src = [torch.randn(40, 2, 16, 4, 128, generator=gen, device="cuda").to(dtype) for _ in range(3)]
    dst = [torch.zeros(50, 2, 16, 4, 128, device="cuda", dtype=dtype) for _ in range(3)]
    src_pages, dst_pages = [3, 17, 5, 39], [49, 0, 21, 8]
    copy_pages(src, dst, src_pages, dst_pages)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[dst_pages], s[src_pages])
        untouched = [i for i in range(50) if i not in dst_pages]
        assert not d[untouched].any()


PROMPTS = [(chat_prompt(IMAGE, "Describe this picture."), [(120, 80)]),
           (chat_prompt("Hello, tell me a story about a red cat."), [])]


def _run(model, tmp, extra):
    roles = {"encoder": [[]], "prefill": [[]], "decode": [[]]}
    common = ["--dtype", "float32", "--heartbeat-ttl", "2", *extra]
    out = []
    with disagg_cluster(model, tmp, roles, common, device="cuda") as h:
        for prompt, sizes in PROMPTS:
            images = [noise_image(w, hh, seed=i) for i, (w, hh) in enumerate(sizes)]
            got = h.generate(prompt, images, max_new_tokens=12)
            assert not got.error, got.error
            out.append(got.token_ids)
        h.assert_pools_intact()
        if "--no-kv-ipc" not in extra:   # a prefill node that leaves must not keep its pool mapped in decode
            prefill = next(n for n in h.cluster.nodes if n.role == "prefill")
            decode = next(n for n in h.cluster.nodes if n.role == "decode")
            prefill.proc.terminate()
            deadline = time.monotonic() + 20
            while "unmapped the KV pool" not in open(decode.log_path).read():
                assert time.monotonic() < deadline, "decode kept the pool of a prefill node that is gone"
                time.sleep(0.2)
    return out


def test_disaggregated_over_cuda_ipc_equals_ucx_and_colocated(tiny_models, tmp_path):
    model = tiny_models["qwen2_5_vl"]
    ipc = _run(model, str(tmp_path / "ipc"), [])
    logs = "".join(open(p).read() for p in glob.glob(str(tmp_path / "ipc" / "prefill-*.log")))
    assert "through CUDA IPC" in logs, "the prefill node did not hand over through CUDA IPC"
    ucx = _run(model, str(tmp_path / "ucx"), ["--no-kv-ipc"])
    logs = "".join(open(p).read() for p in glob.glob(str(tmp_path / "ucx" / "prefill-*.log")))
    assert "through CUDA IPC" not in logs
    with Engine(model_path=model, device="cuda", dtype="float32") as llm:
        colocated = [llm.generate(prompt=p, image_data=[noise_image(w, h, seed=i) for i, (w, h) in enumerate(s)]
                                  or None, sampling_params={"temperature": 0, "max_new_tokens": 12})["output_ids"]
                     for p, s in PROMPTS]
    assert ipc == ucx == colocated
