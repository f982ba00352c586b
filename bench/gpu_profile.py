"""Where device time goes: torch.profiler over a batch-1 decode step (graph replays and eager
steps) and over the vision tower's forward for one 1280x720 image.

`profile_decode(core, path)` writes the profiler's kernel tables to `path` and returns, per mode,
the device time per step split into GEMM, attention, fused Triton kernels and the rest, plus the
ten most expensive kernels: the evidence for what limits a step against the roofline.
`profile_vision(core, path)` does the same for one image through the engine's vision tower.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu_workloads import _decoding_requests
from epd.engine.engine_core import EngineCore
from epd.engine.scheduler import Chunk

_CATEGORIES = (
    ("gemm", ("gemm", "gemv", "xmma", "cutlass", "nvjet", "splitk", "matmul")),
    ("attention", ("batchprefill", "batchdecode", "prefill", "decode", "merge_state", "flashinfer")),
    ("triton", ("_kernel", "triton")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _summary(prof, steps: int) -> dict:
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernels = kernels or [e for e in events if e.self_device_time_total > 0]  # older attribute layouts
    by_cat: dict[str, float] = {}
    for e in kernels:
        by_cat[_category(e.key)] = by_cat.get(_category(e.key), 0.0) + e.device_time_total / steps
    top = sorted(kernels, key=lambda e: e.device_time_total, reverse=True)[:10]
    return {"device_us_per_step": sum(by_cat.values()), "by_category_us": by_cat,
            "kernels_per_step": sum(e.count for e in kernels) / steps,
            "top": [{"name": e.key[:120], "us_per_step": e.device_time_total / steps, "calls": e.count}
                    for e in top]}


def profile_decode(core: EngineCore, path: str, steps: int = 5) -> dict:
    reqs = _decoding_requests(core, 1, 1024, torch.Generator().manual_seed(7))
    chunks = [Chunk(r, r.num_computed, 1) for r in reqs]
    out: dict = {}
    tables = []
    graphs = core.runner.graphs
    modes = [("graph", lambda: graphs.replay(1))] if graphs else []
    saved = core.runner.graphs
    modes.append(("eager", lambda: core.runner.run(chunks)))
    try:
        if graphs:
            graphs.prepare(chunks, 1)
        for mode, fn in modes:
            core.runner.graphs = None if mode == "eager" else saved
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
            out[mode] = _summary(prof, steps)
            tables.append(f"== {mode} decode, batch 1, {steps} steps ==\n"
                          + prof.key_averages().table(sort_by="device_time_total", row_limit=25))
    finally:
        core.runner.graphs = saved
        for r in reqs:
            core.abort(r.rid)
    with open(path, "w") as f:
        f.write("\n\n".join(tables))
    return out


def profile_vision(core: EngineCore, path: str, runs: int = 3) -> dict:
    """Device time of the engine's vision tower on one 1280x720 image (preprocessed as served)."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(720, 1280, 3) * 255).astype("uint8"))
    pre = core.inputs.image_processor.preprocess_many([img])[0]
    core.vision.encode([pre])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            core.vision.encode([pre])
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(f"== vision tower, one 1280x720 image (layout {pre.layout.to_wire()}), {runs} runs ==\n"
                + prof.key_averages().table(sort_by="device_time_total", row_limit=30))
    return _summary(prof, runs)
