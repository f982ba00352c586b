"""Host time of an engine decode step, the forward left out: what the overlap schedule must hide.

    python3 -m bench.host_step --model DIR [--batch 32,128] [--device cpu] [--out FILE]

`batch` requests with 1024-token prompts count as prefilled (as a decode node holds them after the
KV transfer) and decode greedily; the model's forward is replaced by a stub that builds the step's
inputs as the eager path does (`ModelRunner.step_inputs`: ids, M-RoPE positions, page tables,
KV write slots) and returns fixed random logits. Per step (best of 5 rounds of 50 steps): the
whole `EngineCore.step()`, and within it scheduling, staging the inputs, the greedy argmax with
its copy, and settling the tokens (stop rules, detokenizing). On a GPU the CUDA-graph path stages
through `CudaGraphDecodeRunner.prepare` instead, which `bench.gpu_bench` times (`host_ms`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

CONTEXT = 1024


def _engine(path: str, batch: int, device: str):
    from transformers import AutoTokenizer

    from epd.engine.engine_core import EngineConfig, EngineCore
    from epd.engine.sampling import SamplingParams

    core = EngineCore(EngineConfig(model_path=path, device=device, max_running_requests=batch,
                                   kv_cache_tokens=batch * (CONTEXT + 400), load_vision=False),
                      AutoTokenizer.from_pretrained(path))
    gen = torch.Generator().manual_seed(batch)
    vocab = core.model_config.text.vocab_size - 100
    for _ in range(batch):
        ids = torch.randint(0, vocab, (CONTEXT,), generator=gen).tolist()
        req = core.new_request(core.inputs.process(input_ids=ids),
                               SamplingParams(temperature=0, max_new_tokens=1 << 20, ignore_eos=True))
        req.pages = core.kv.pool.allocate(core.kv.pool.pages_for(CONTEXT + 1))
        req.num_computed = CONTEXT
        core.scheduler.admit_prefilled(req)
        core._append_token(req, int(torch.randint(0, vocab, (1,), generator=gen)), None, None)
    return core


def measure(path: str, batch: int, device: str, rounds: int = 5, steps: int = 50) -> dict:
    core = _engine(path, batch, device)
    logits = torch.randn(batch, core.model_config.text.vocab_size, device=core.device)
    spent: dict[str, float] = {}

    def timed(name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return out
        return call

    def stub_forward(chunks, after_layer=None):
        core.runner.step_inputs(chunks)
        return logits[:sum(1 for c in chunks if c.samples)]

    core.scheduler.schedule = timed("schedule", core.scheduler.schedule)
    core.runner.run = timed("stage_inputs", stub_forward)
    core.runner.sample_ahead = timed("argmax_and_copy", core.runner.sample_ahead)
    core._settle_step = timed("settle_tokens", core._settle_step)
    for _ in range(5):
        core.step()
    best: dict | None = None
    for _ in range(rounds):
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        total = (time.perf_counter() - t0) / steps * 1e3
        if best is None or total < best["step_ms"]:
            best = {"step_ms": total, **{f"{k}_ms": v / steps * 1e3 for k, v in spent.items()}}
    return {"batch": batch, "context": CONTEXT, "device": str(core.device), **(best or {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.host_step", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (a tiny one is enough)")
    ap.add_argument("--batch", default="32,128")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [measure(args.model, int(b), args.device) for b in args.batch.split(",")]
    for r in rows:
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"schema": "epd.host_step/1", "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
