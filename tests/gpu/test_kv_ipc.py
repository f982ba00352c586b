"""Same-host KV hand-over through CUDA IPC: the page-copy kernel, real prefill/decode node
processes on one GPU whose greedy tokens equal the colocated engine's and the UCX path's (the
encoder writing the image embeddings into the prefill node's arena, or sending them over UCX), the
same tokens when prefill cannot open decode's pool (the KV goes over the wire instead), the
capability a node publishes, and an abort while prefill may still write into decode's pages."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import signal
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from disagg_support import disagg_cluster  # noqa: E402
from support import IMAGE, chat_prompt, family_prompt, noise_image  # noqa: E402

from epd import Engine  # noqa: E402
from kv_transfer.cuda_ipc import (  # noqa: E402
    IpcCapability,
    PageWriter,
    copy_pages,
    ipc_capability,
    ipc_pairable,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_pages_moves_exactly_the_listed_pages(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    src = [torch.randn(40, 2, 16, 4, 128, generator=gen, device="cuda").to(dtype) for _ in range(3)]
    dst = [torch.zeros(50, 2, 16, 4, 128, device="cuda", dtype=dtype) for _ in range(3)]
    src_pages, dst_pages = [3, 17, 5, 39], [49, 0, 21, 8]
    copy_pages(src, dst, src_pages, dst_pages)
    torch.cuda.synchronize()
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[dst_pages], s[src_pages])
        untouched = [i for i in range(50) if i not in dst_pages]
        assert not d[untouched].any()
    writer = PageWriter(src, dst)   # reused across requests, as the prefill node does
    writer.write([0, 1], [30, 31])
    writer.write([2], [32])
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[[30, 31, 32]], s[[0, 1, 2]])


PROMPTS = [(chat_prompt(IMAGE, "Describe this picture."), [(120, 80)]),
           (chat_prompt("Hello, tell me a story about a red cat."), [])]


ROLES = {"encoder": [[]], "prefill": [[]], "decode": [[]]}
SMALL_POOLS = ["--kv-cache-tokens", "16384"]   # node pools of a few MB, whatever this process holds


EMBEDDINGS_VIA_IPC: dict[str, list[float]] = {}   # per run directory: embeddings_through_ipc of each image request


def _run(model, tmp, extra, env=None, prompts=PROMPTS):
    common = ["--dtype", "float32", "--heartbeat-ttl", "2", *SMALL_POOLS, *extra]
    out = []
    with disagg_cluster(model, tmp, ROLES, common, device="cuda", env=env) as h:
        for prompt, sizes in prompts:
            images = [noise_image(w, hh, seed=i) for i, (w, hh) in enumerate(sizes)]
            got = h.generate(prompt, images, max_new_tokens=12)
            assert not got.error, got.error
            out.append(got.token_ids)
            if images:
                EMBEDDINGS_VIA_IPC.setdefault(tmp, []).append(got.timings.get("embeddings_through_ipc"))
        h.assert_pools_intact()
        if "--no-kv-ipc" not in extra:   # a decode node that leaves must not keep its pool mapped in prefill
            prefill, decode = h.node("prefill"), h.node("decode")
            decode.proc.terminate()
            deadline = time.monotonic() + 20
            while "unmapped the KV pool" not in open(prefill.log_path).read():
                assert time.monotonic() < deadline, "prefill kept the pool of a decode node that is gone"
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
    assert EMBEDDINGS_VIA_IPC[str(tmp_path / "ipc")] == [1.0], "the encoder wrote into the prefill node's arena"
    assert EMBEDDINGS_VIA_IPC[str(tmp_path / "ucx")] == [0.0], "--no-kv-ipc: embeddings over UCX"
    with Engine(model_path=model, device="cuda", dtype="float32") as llm:
        colocated = [llm.generate(prompt=p, image_data=[noise_image(w, h, seed=i) for i, (w, h) in enumerate(s)]
                                  or None, sampling_params={"temperature": 0, "max_new_tokens": 12})["output_ids"]
                     for p, s in PROMPTS]
    torch.cuda.empty_cache()   # the engine's pool goes back to the GPU, not to this process's cache
    assert ipc == ucx == colocated


def _colocated(model, prompts) -> list[list[int]]:
    with Engine(model_path=model, device="cuda", dtype="float32") as llm:
        out = [llm.generate(prompt=p, image_data=[noise_image(w, h, seed=i) for i, (w, h) in enumerate(s)] or None,
                            sampling_params={"temperature": 0, "max_new_tokens": 12})["output_ids"] for p, s in prompts]
    torch.cuda.empty_cache()
    return out


def test_llama_3_2_vision_writes_its_image_rows_through_cuda_ipc_token_exact(tiny_models, tmp_path):
    """A cross-attention family's pool is one buffer of strided layer views: prefill writes the
    prompt's pages and the image rows' pages of it through CUDA IPC; the tokens equal the UCX
    path's (the rows as a CrossRows message) and the colocated engine's."""
    from transformers import AutoTokenizer

    model = tiny_models["mllama"]
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [(family_prompt(tok, IMAGE, "Describe this picture."), [(120, 80)]),
               (family_prompt(tok, "First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(300, 90), (50, 50)]),
               (family_prompt(tok, "Hello, tell me a story about a red cat."), [])]
    ipc = _run(model, str(tmp_path / "ipc"), [], prompts=prompts)
    handed = re.findall(r"KV of \S+: \d+ bytes handed to decode node \S+ through CUDA IPC",
                        _prefill_logs(str(tmp_path / "ipc")))
    assert len(handed) == len(prompts), "every request's KV (and image rows) written through CUDA IPC"
    ucx = _run(model, str(tmp_path / "ucx"), ["--no-kv-ipc"], prompts=prompts)
    assert ipc == ucx == _colocated(model, prompts)


def _prefill_logs(tmp) -> str:
    return "".join(open(p).read() for p in glob.glob(os.path.join(tmp, "prefill-*.log")))


def test_a_decode_pool_prefill_cannot_open_hands_the_kv_over_the_wire_token_exact(tiny_models, tmp_path):
    """Every CUDA IPC handle fails to open in the nodes (`ipc_unmappable`): the requests still
    complete, with the tokens the UCX path gives, and prefill warns once for the decode pool."""
    model = tiny_models["qwen2_5_vl"]
    unmappable = os.path.join(os.path.dirname(__file__), "ipc_unmappable")
    env = {"PYTHONPATH": os.pathsep.join([unmappable, *filter(None, [os.environ.get("PYTHONPATH")])])}
    fallback = _run(model, str(tmp_path / "fallback"), [], env=env)
    logs = _prefill_logs(str(tmp_path / "fallback"))
    assert "through CUDA IPC" not in logs and logs.count("over UCX (CUDA IPC failed)") == len(PROMPTS)
    assert logs.count("its KV goes over UCX instead") == 1 and "refused by tests/gpu/ipc_unmappable" in logs
    ucx = _run(model, str(tmp_path / "ucx"), ["--no-kv-ipc"])
    assert fallback == ucx


def test_a_gpu_node_publishes_its_pool_s_gpu_among_those_it_sees():
    cap = IpcCapability.parse(ipc_capability("cuda:0", 16))
    assert cap is not None and cap.page_size == 16 and cap.gpu.startswith(("GPU-", "MIG-"))
    assert cap.gpu in cap.visible and len(cap.visible) == torch.cuda.device_count()
    assert ipc_pairable(cap.to_wire(), cap.to_wire())


def test_abort_before_prefill_wrote_keeps_decode_pages_fenced_until_released(tiny_models, tmp_path):
    """Decode has told prefill where to write, the client goes away, prefill is still busy: decode
    must not reuse those pages until prefill says it will not write them."""
    common = ["--dtype", "float32", "--heartbeat-ttl", "30", *SMALL_POOLS]
    with disagg_cluster(tiny_models["qwen2_5_vl"], str(tmp_path), ROLES, common, device="cuda") as h:
        prefill, decode = h.node("prefill"), h.node("decode")
        os.killpg(prefill.proc.pid, signal.SIGSTOP)   # prefill cannot write, nor release, while stopped
        try:
            async def abort_while_prefill_is_stopped():
                task = asyncio.ensure_future(h.consume(h.request(PROMPTS[1][0], max_new_tokens=8)))
                await h.until_queued(decode, "awaiting_kv")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await asyncio.sleep(1.0)
                return await h.backend.node_status("decode", decode.node_id)

            status = h.run(abort_while_prefill_is_stopped())
        finally:
            os.killpg(prefill.proc.pid, signal.SIGCONT)
        assert status.queues["fenced"] == 1 and status.queues["awaiting_kv"] == 0
        assert status.pages_free < status.pages_total, "decode freed pages prefill may still write"
        h.assert_pools_intact()   # prefill takes the abort, releases the pages, decode frees them
        assert h.generate(*PROMPTS[1][:1], max_new_tokens=4).token_ids, "serving goes on"
