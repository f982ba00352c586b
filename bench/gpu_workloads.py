"""The measurements `bench.gpu_bench` runs on one GPU: ceilings, decode, prefill, baselines, vision.

Each function takes what it measures (an `EngineCore`, a checkpoint path) and returns a plain
dict for the JSON report. Device time comes from CUDA events; wall time from `perf_counter`
after a synchronize. Inputs are random token ids (never zeros) and random KV contents.
"""

from __future__ import annotations

import statistics
import time

import torch

from epd.engine.engine_core import EngineCore
from epd.engine.request import Request
from epd.engine.sampling import SamplingParams
from epd.engine.scheduler import Chunk


def _events_ms(fn, iters: int) -> float:
    """Median-free mean of `iters` back-to-back calls, timed with device events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def graph_us_per_call(fn, calls: int, repeats: int = 20) -> float:
    """Median microseconds per call of `fn` captured `calls` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def _best_ms(op, shape: tuple[int, ...], iters: int) -> float:
    """Best of three timed batches of `op(x, y)` on fresh random bf16 inputs (warm-up first)."""
    x, y = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        op(x, y)
    return min(_events_ms(lambda: op(x, y), iters) for _ in range(3))


def ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, measured here."""
    copy_ms = _best_ms(lambda src, dst: dst.copy_(src), (1 << 30,), 10)  # 2 GiB of bf16 each way
    n = 8192
    mm_ms = _best_ms(lambda a, b: a @ b, (n, n), 20)
    return {"d2d_copy_GBps": 2 * (1 << 30) * 2 / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9}


def model_facts(core: EngineCore) -> dict:
    """Bytes a decode step must read for weights, KV bytes per token, matmul parameters per token:
    of one rank under tensor parallelism (its slice of the weights, its KV heads, its experts)."""
    model, tc = core.model, core.model_config.text
    ranks = core.tp.group.size if core.tp is not None else 1
    params = list(model.parameters())  # tied weights appear once
    total = sum(p.numel() * p.element_size() for p in params)
    embed = model.language_model.embed_tokens.weight
    lm_head = model.lm_head.weight
    weight_bytes = total if lm_head is embed else total - embed.numel() * embed.element_size()
    cross = tuple(getattr(model, "cross_layers", ()))
    matmuls = {n: p.numel() for n, p in model.named_parameters()
               if ".layers." in n and n.endswith("weight") and "norm" not in n}
    in_cross = {n for n in matmuls if any(f".layers.{i}." in n for i in cross)}
    row_bytes = 2 * core.kv.spec.num_kv_heads * tc.head_dim * embed.element_size()   # one layer's K, V of a token/row
    moe = _routed_experts(model)
    return {"decode_weight_bytes": weight_bytes, "kv_bytes_per_token": (tc.num_layers - len(cross)) * row_bytes,
            **moe,
            "cross_kv_bytes_per_row": len(cross) * row_bytes,   # cross-attention layers: image rows, not tokens
            "layer_matmul_params": sum(matmuls.values()),
            "cross_layer_matmul_params": sum(matmuls[n] for n in in_cross), "lm_head_params": lm_head.numel(),
            "num_layers": tc.num_layers, "cross_layers": len(cross), "num_heads": tc.num_heads // ranks,
            "head_dim": tc.head_dim, "tensor_parallel_size": ranks}


def _routed_experts(model: torch.nn.Module) -> dict:
    """A mixture-of-experts model's routed experts (modules with `top_k` and batched `experts`
    weights [E, ...]): per layer E (this rank's: `num_experts`; the model's: `routed_experts`, the
    router's outputs), k, and one expert's parameters and bytes; zeros for a dense model."""
    layers = [m for m in model.modules() if hasattr(m, "top_k") and hasattr(m, "experts")]
    if not layers:
        return {"moe_layers": 0, "num_experts": 0, "routed_experts": 0, "top_k": 0, "expert_params": 0,
                "expert_bytes": 0}
    weights = list(layers[0].experts.parameters())
    experts = weights[0].shape[0]
    router = getattr(layers[0], "router", None)
    params = sum(w.numel() for w in weights) // experts
    return {"moe_layers": len(layers), "num_experts": experts, "top_k": layers[0].top_k, "expert_params": params,
            "routed_experts": router.out_features if router is not None else experts,
            "expert_bytes": params * weights[0].element_size()}


def step_weight_bytes(facts: dict, batch: int) -> float:
    """Weight bytes a decode step of `batch` tokens reads: every dense weight, and of each MoE layer's
    routed experts the expected number a batch picks (uniform routing: E * (1 - (1 - k/E)^batch); of
    a rank's experts under tensor parallelism, each picked with the same chance)."""
    experts, k = facts.get("num_experts", 0), facts.get("top_k", 0)
    if not experts:
        return facts["decode_weight_bytes"]
    routed = facts.get("routed_experts") or experts
    all_experts = facts["moe_layers"] * experts * facts["expert_bytes"]
    touched = experts * (1 - (1 - k / routed) ** batch)
    return facts["decode_weight_bytes"] - all_experts + facts["moe_layers"] * touched * facts["expert_bytes"]


def _decoding_requests(core: EngineCore, batch: int, context: int, gen: torch.Generator,
                       cross_rows: int = 0) -> list[Request]:
    """`batch` requests whose `context`-token prompts count as prefilled (random KV), each with
    one pending token: the state a decode node is in after the KV transfer. `cross_rows`
    (cross-attention models): each also holds one image of that many rows, which its tokens read."""
    vocab = core.model_config.text.vocab_size - 1000
    reqs = []
    for _ in range(batch):
        ids = torch.randint(0, vocab, (context,), generator=gen).tolist()
        req = core.new_request(core.inputs.process(input_ids=ids),
                               SamplingParams(temperature=0, max_new_tokens=4096, ignore_eos=True))
        req.pages = core.kv.pool.allocate(core.kv.pool.pages_for(context + 1))  # + the pending token
        req.num_computed = context
        if cross_rows:   # one image at the prompt's start, seen by every token after it
            req.inp.cross_rows, req.inp.cross_spans = [(cross_rows, cross_rows)], [(0, -1)]
            req.cross_pages = core.kv.pool.allocate(core.kv.pool.pages_for_rows(cross_rows))
            req.cross_ready = True
        core.scheduler.admit_prefilled(req)
        core._append_token(req, int(torch.randint(0, vocab, (1,), generator=gen)), None, None)
        reqs.append(req)
    return reqs


def decode(core: EngineCore, facts: dict, bw: float, batch: int, context: int, graphs: bool,
           steps: int = 32) -> dict:
    """Engine steps (wall; with the overlap schedule when `core.overlap`) and the forward alone
    (device events) at `batch` x `context`; each request also reads `facts["decode_cross_rows"]`
    image rows (cross-attention models)."""
    cross_rows = facts.get("decode_cross_rows", 0)
    saved = core.runner.graphs
    core.runner.graphs = saved if graphs else None
    reqs = _decoding_requests(core, batch, context, torch.Generator().manual_seed(batch), cross_rows)
    try:
        for _ in range(3):
            core.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
        engine_ms = (time.perf_counter() - t0) / steps * 1e3
        core.flush()   # overlap schedule: the last step's tokens, so the requests hold real ids again
        chunks = [Chunk(r, r.num_computed, 1) for r in reqs]
        host = None
        if graphs and saved is not None:
            bs = saved.bucket(batch)
            host = _host_breakdown(saved, chunks, bs)
            if core.tp is None:
                forward_ms = _events_ms(lambda: saved.replay(bs), 20)
            else:   # every rank must replay too: the leader's prepare sends them the step (staging counted)
                forward_ms = _events_ms(lambda: (saved.prepare(chunks, bs), saved.replay(bs)), 20)
        else:
            forward_ms = _events_ms(lambda: core.runner.run(chunks), 10)
        ctx = reqs[0].num_computed
    finally:
        core.runner.graphs = saved
        for r in reqs:
            core.abort(r.rid)
    step_bytes = step_weight_bytes(facts, batch) + batch * (ctx * facts["kv_bytes_per_token"]
                                                         + cross_rows * facts["cross_kv_bytes_per_row"])
    return {"batch": batch, "context": context, "cross_rows": cross_rows, "cuda_graph": graphs, "overlap": core.overlap,
            "engine_step_ms": engine_ms,
            "forward_ms": forward_ms, "tokens_per_s": batch / engine_ms * 1e3, "bytes_per_step": step_bytes,
            "host_ms": host,
            "roofline_pct_forward": 100 * step_bytes / (forward_ms / 1e3) / (bw * 1e9),
            "roofline_pct_engine": 100 * step_bytes / (engine_ms / 1e3) / (bw * 1e9)}


def _host_breakdown(graphs, chunks: list[Chunk], bs: int, iters: int = 10) -> dict:
    """Where an engine step's time outside the forward goes: staging + flashinfer plan on the
    host, the CPU cost of the graph launch call, and launch-to-finish (host clocks, GPU idle at start)."""
    sums = [0.0, 0.0, 0.0]
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graphs.prepare(chunks, bs)
        t1 = time.perf_counter()
        graphs.replay(bs)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        for i, d in enumerate((t1 - t0, t2 - t1, t3 - t1)):
            sums[i] += d * 1e3 / iters
    return {"prepare_and_plan": sums[0], "graph_launch_call": sums[1], "launch_to_done": sums[2]}


def prefill(core: EngineCore, facts: dict, peak_tflops: float, batch: int, length: int, repeats: int = 3) -> dict:
    """One engine step that prefills `batch` prompts of `length` tokens (and samples their first token)."""
    gen = torch.Generator().manual_seed(length)
    vocab = core.model_config.text.vocab_size - 1000
    times = []
    for _ in range(repeats + 1):
        reqs = [core.new_request(core.inputs.process(input_ids=torch.randint(0, vocab, (length,), generator=gen)
                                                     .tolist()), SamplingParams(temperature=0, max_new_tokens=1))
                for _ in range(batch)]
        for r in reqs:
            core.add(r)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        events = core.step() + core.flush()   # flush: the overlap schedule leaves the tokens in flight
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        done = {e.rid for e in events if e.finished}
        assert all(r.rid in done for r in reqs), f"prefill must fit one step ({len(events)} events)"
    sec = sorted(times[1:])[len(times[1:]) // 2]
    tokens = batch * length
    attn = 4 * facts["num_heads"] * facts["head_dim"] * facts["num_layers"] * batch * length * (length + 1) // 2
    layers = facts["num_layers"] - facts.get("cross_layers", 0)   # a prompt without images skips the cross layers
    attn = attn * layers // facts["num_layers"]
    params = facts["layer_matmul_params"] - facts.get("cross_layer_matmul_params", 0)
    params += facts.get("moe_layers", 0) * facts.get("top_k", 0) * facts.get("expert_params", 0)   # routed: k a token
    flops = 2 * params * tokens + 2 * facts["lm_head_params"] * batch + attn
    return {"shape": f"{batch}x{length}", "ms": sec * 1e3, "tokens_per_s": tokens / sec, "flops": flops,
            "mfu_pct": 100 * flops / sec / (peak_tflops * 1e12)}


def hf_decode(path: str, batch: int, context: int, new_tokens: int = 33) -> dict:
    """transformers `generate` with a static cache (compile off: see BENCHMARKS.md), bf16, SDPA.
    Decode rate from two runs that differ only in the number of new tokens."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    vocab = model.config.text_config.vocab_size - 1000
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(1)).cuda()
    _hf_timed(model, ids, 2)
    short, long = _hf_timed(model, ids, 1), _hf_timed(model, ids, new_tokens)
    model = None
    torch.cuda.empty_cache()
    return {"batch": batch, "context": context, "tokens_per_s": batch * (new_tokens - 1) / (long - short),
            "step_ms": (long - short) / (new_tokens - 1) * 1e3}


def _hf_timed(model, ids: torch.Tensor, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, cache_implementation="static", disable_compile=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def vision(core: EngineCore, batches: tuple[int, ...] = (1, 4)) -> dict:
    """Images/s of the engine's vision encoder and of transformers' own path (the family's
    `reference_vision`), same weights, preprocessed 1280x720 images (preprocessing not timed)."""
    import numpy as np
    from PIL import Image

    ref = core.model_config.family.reference_vision(core.device, core.dtype)
    rng = np.random.RandomState(0)
    img = Image.fromarray((rng.rand(720, 1280, 3) * 255).astype("uint8"))
    pre = core.inputs.image_processor.preprocess_many([img])[0]
    out: dict = {"image": "1280x720", "layout": pre.layout.to_wire(), "tokens_per_image": pre.layout.num_tokens,
                 "encoder": type(core.vision).__name__, "reference": type(ref).__name__, "rows": []}
    for b in batches:
        row = {"batch": b}
        for name, tower in (("ours", core.vision), ("transformers", ref)):
            tower.encode([pre] * b)
            ms = min(_events_ms(lambda t=tower, batch=[pre] * b: t.encode(batch), 3) for _ in range(2))
            row[f"{name}_images_per_s"] = b / ms * 1e3
        row["speedup"] = row["ours_images_per_s"] / row["transformers_images_per_s"]
        out["rows"].append(row)
    del ref
    torch.cuda.empty_cache()
    return out
