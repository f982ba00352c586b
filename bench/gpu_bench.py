"""GPU benchmark of the engine's fast path, all in one run so ratios share one machine state.

    python3 -m bench.gpu_bench --out $OUT/gpu.json --model 3b=/tmp/m3b --model 7b=/tmp/m7b

Sections, per model (JSON written after each, so a run cut short still reports what it did):
  1. decode step with CUDA graphs and without, batch 1/8/32/128 at 1024-token contexts:
     engine step wall time (overlap schedule on), forward device time, tokens/s, % of the HBM
     roofline ((weight bytes + KV bytes read) / step time / device-to-device copy bandwidth of
     this run). Variants with graphs, each against the same code with one piece taken out:
     each step's tokens read before the next is scheduled (`decode_without_overlap`, batch
     1/8/32/128); cuBLAS instead of the decode GEMV kernels (`decode_without_gemv`, batch 1/8);
     no programmatic dependent launch (`decode_without_pdl`, batch 1/8); the projection GEMVs'
     first weight tile loaded after the PDL wait (`decode_without_weight_prefetch`, batch 1/8);
     cuBLAS's gate/up GEMM and the silu*mul kernel instead of the fused gate/up kernel
     (`decode_without_fused_gate_up`, batch 1/8); flashinfer's decode attention instead of the
     split-KV kernels (`decode_flashinfer_attention`); and with `--gemv-configs GEMV_JSON` (a
     `bench.gpu_gemv --sweep` report) the GEMVs with the sweep's best block configs for 1 row
     (`decode_with_swept_gemv_configs`, batch 1/8);
  2. output tokens/s against transformers `generate` (static cache) on the same weights;
  3. prefill tokens/s and MFU (against this run's measured bf16 matmul rate), 1x4096 and 8x1024;
  5. vision-tower images/s against transformers' tower on the same weights (1280x720 image);
  profile: torch.profiler device-time summary of one batch-1 decode (graph replay and eager), and
  of the vision tower on one 1280x720 image (`vision_profile`, with section 5).
Sections 4 (KV transfer over UCX) and 5a (disaggregated TTFT) need two or more processes:
`python3 -m bench.gpu_kv_transfer` and `python3 -m bench.gpu_disagg_ttft` write their own JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time

import torch

from bench import gpu_workloads as w

SCHEMA = "epd.gpu_bench/1"
DECODE_BATCHES = (1, 8, 32, 128)
CONTEXT = 1024


def _machine() -> dict:
    import transformers

    try:
        import flashinfer
        fi = flashinfer.__version__
    except ImportError:
        fi = None
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "flashinfer": fi, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


class Report:
    def __init__(self, path: str, argv: list[str]) -> None:
        self.path = path
        self.data: dict = {"schema": SCHEMA, "command": "python3 -m bench.gpu_bench " + " ".join(argv),
                           "machine": _machine(), "ceilings": None, "models": {},
                           "errors": []}

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=2)

    def section(self, model: str, key: str, fn) -> None:
        """Run one section; a failure is recorded and the run goes on."""
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - a benchmark reports failures, it does not stop at them
            logging.exception("%s/%s failed", model, key)
            self.data["errors"].append(f"{model}/{key}: {type(e).__name__}: {e}")
            value = None
        self.data["models"].setdefault(model, {})[key] = value
        print(f"[{model}] {key}: {time.perf_counter() - t0:.1f}s", flush=True)
        self.save()


def _engine(path: str, vision: bool, tp: int = 1):
    from transformers import AutoTokenizer

    from epd.config import ModelConfig
    from epd.engine.engine_core import EngineConfig, EngineCore

    mc = ModelConfig.from_pretrained(path)
    tc = mc.text
    wanted = max(DECODE_BATCHES) * (CONTEXT + 64) + 4 * 8192
    kv_bytes = wanted * tc.num_layers * 2 * tc.num_kv_heads // tp * tc.head_dim * 2   # a rank's share
    # a pool too large for the GPU (LLaVA-1.5-7B's 32 KV heads: 0.5 MB a token) is sized from memory
    # instead, and the decode batches it cannot hold at CONTEXT are left out; so is a cross-attention
    # model's (its requests' image rows take pages too)
    fits = kv_bytes < 0.6 * torch.cuda.get_device_properties(0).total_memory and not mc.family.cross_attention
    cfg = EngineConfig(model_path=path, max_running_requests=max(DECODE_BATCHES), max_step_tokens=8192,
                       kv_cache_tokens=wanted if fits else None, load_vision=vision, tensor_parallel_size=tp)
    t0 = time.perf_counter()
    core = EngineCore(cfg, AutoTokenizer.from_pretrained(path))
    for layer in core.kv.layers:  # decode reads KV that was never prefilled: make it real numbers
        layer.normal_()
    graphs = core.runner.graphs
    return core, {"load_s": time.perf_counter() - t0, "backend": type(core.runner.backend).__name__,
                  "graph_buckets": graphs.buckets if graphs else [],
                  "graph_capture_s": graphs.capture_seconds if graphs else None}


def _fitting(core, cross_rows: int = 0) -> tuple[int, ...]:
    """The decode batches whose CONTEXT-token requests (with `cross_rows` image rows each) the KV
    pool holds."""
    pool = core.kv.pool
    per_request = pool.pages_for(CONTEXT + 64) + (pool.pages_for_rows(cross_rows) if cross_rows else 0)
    return tuple(b for b in DECODE_BATCHES if b * per_request <= pool.capacity)


def _decode_all(core, facts: dict, bw: float) -> list[dict]:
    rows = []
    for graphs in (True, False):
        for b in _fitting(core, facts.get("decode_cross_rows", 0)):
            rows.append(w.decode(core, facts, bw, b, CONTEXT, graphs))
            r = rows[-1]
            print(f"  decode b={b:<3} graphs={graphs!s:<5} engine {r['engine_step_ms']:.2f} ms "
                  f"forward {r['forward_ms']:.2f} ms  {r['tokens_per_s']:.0f} tok/s  "
                  f"roofline fwd {r['roofline_pct_forward']:.0f}% engine {r['roofline_pct_engine']:.0f}%"
                  f"  host {r['host_ms']}", flush=True)
    return rows


def _decode_variant(core, facts: dict, bw: float, module, attr: str, value, batches) -> list[dict]:
    """Graph decode with `module.attr = value` (graphs captured again), then back as it was: what a
    fast-path piece buys, measured in the same run."""
    graphs, saved = core.runner.graphs, getattr(module, attr)
    setattr(module, attr, value)
    try:
        graphs.capture()
        rows = [w.decode(core, facts, bw, b, CONTEXT, True) for b in batches]
    finally:
        setattr(module, attr, saved)
        graphs.capture()
    for r in rows:
        shown = "swept" if callable(value) else value
        print(f"  decode b={r['batch']:<3} {attr}={shown}: forward {r['forward_ms']:.2f} ms "
              f"roofline fwd {r['roofline_pct_forward']:.0f}%", flush=True)
    return rows


def _decode_without_overlap(core, facts: dict, bw: float) -> list[dict]:
    """Graph decode with each step's tokens read before the next step is scheduled: what the
    overlap schedule buys (engine step against the same forward)."""
    core.overlap = False
    try:
        rows = [w.decode(core, facts, bw, b, CONTEXT, True) for b in DECODE_BATCHES]
    finally:
        core.overlap = True
    for r in rows:
        print(f"  decode b={r['batch']:<3} overlap=False: engine {r['engine_step_ms']:.2f} ms "
              f"forward {r['forward_ms']:.2f} ms roofline engine {r['roofline_pct_engine']:.0f}%", flush=True)
    return rows


def _profile(core, out_dir: str, name: str) -> dict:
    from bench.gpu_profile import profile_decode

    return profile_decode(core, os.path.join(out_dir, f"profile_{name}.txt"))


def _profile_vision(core, out_dir: str, name: str) -> dict:
    from bench.gpu_profile import profile_vision

    return profile_vision(core, os.path.join(out_dir, f"profile_vision_{name}.txt"))


def _swept_block_config(default, best: dict):
    """decode_gemv.block_config that returns a sweep's best config for the shapes it ranked."""
    def block_config(n: int, k: int) -> dict:
        return best.get(f"{n}x{k}") or default(n, k)
    return block_config


def _load_gemv_configs(path: str) -> dict:
    """A gpu_gemv report's `best_configs` for 1 row, by "NxK" shape (empty without a path)."""
    if not path:
        return {}
    with open(path) as f:
        best = json.load(f).get("best_configs", [])
    return {f"{c['shape'][0]}x{c['shape'][1]}": c["config"] for c in best if c["rows"] == 1}


def _decode_sections(report: Report, name: str, core, facts: dict, bw: float, gemv_configs: dict,
                     variants: bool) -> None:
    """Section 1 and (`variants`) its variants: graphs captured again without (or with another)
    fast-path piece."""
    from epd.engine.attention import flashinfer_backend
    from epd.kernels import decode_gemv, fused_ops

    report.section(name, "decode", lambda: _decode_all(core, facts, bw))
    if not variants:
        return
    report.section(name, "decode_without_overlap", lambda: _decode_without_overlap(core, facts, bw))
    report.section(name, "decode_without_gemv",     # cuBLAS q/k/v, o_proj, down_proj
                   lambda: _decode_variant(core, facts, bw, decode_gemv, "MAX_ROWS", 0, (1, 8)))
    report.section(name, "decode_without_pdl",      # kernels not launched to overlap the one before
                   lambda: _decode_variant(core, facts, bw, fused_ops, "PDL", False, (1, 8)))
    report.section(name, "decode_without_weight_prefetch",   # GEMVs load their first weight tile after the PDL wait
                   lambda: _decode_variant(core, facts, bw, decode_gemv, "PREFETCH_WEIGHTS", False, (1, 8)))
    report.section(name, "decode_without_fused_gate_up",   # cuBLAS gate/up GEMM + the silu*mul kernel
                   lambda: _decode_variant(core, facts, bw, decode_gemv, "FUSED_GATE_UP", False, (1, 8)))
    if gemv_configs:   # the GEMV block configs a sweep (bench.gpu_gemv --sweep) ranked best
        report.section(name, "decode_with_swept_gemv_configs",
                       lambda: _decode_variant(core, facts, bw, decode_gemv, "block_config",
                                               _swept_block_config(decode_gemv.block_config, gemv_configs), (1, 8)))
    report.section(name, "decode_flashinfer_attention",   # flashinfer's decode wrapper in the graphs
                   lambda: _decode_variant(core, facts, bw, flashinfer_backend, "GRAPH_DECODE", "flashinfer",
                                           DECODE_BATCHES))


def _engine_sections(report: Report, name: str, core, args: argparse.Namespace) -> dict[int, float]:
    """Sections 1, 3, 5 and the profile on one loaded engine; returns graph decode tokens/s by batch."""
    ceil = report.data["ceilings"]
    facts = w.model_facts(core)
    if facts["cross_layers"]:
        facts["decode_cross_rows"] = args.cross_rows
    report.data["models"][name]["facts"] = facts
    wanted = set(args.sections.split(","))
    if "decode" in wanted:
        _decode_sections(report, name, core, facts, ceil["d2d_copy_GBps"], _load_gemv_configs(args.gemv_configs),
                         "variants" in wanted)
    if "profile" in wanted:
        report.section(name, "profile", lambda: _profile(core, os.path.dirname(os.path.abspath(args.out)), name))
    if "prefill" in wanted:
        longest = min(4096, core.max_context - 1)   # LLaVA-1.5's context is 4096 tokens, output included
        report.section(name, "prefill", lambda: [w.prefill(core, facts, ceil["bf16_matmul_TFLOPs"], 1, longest),
                                                 w.prefill(core, facts, ceil["bf16_matmul_TFLOPs"], 8, 1024)])
    if name in args.vision and "vision" in wanted:
        report.section(name, "vision", lambda: w.vision(core))
        out_dir = os.path.dirname(os.path.abspath(args.out))
        report.section(name, "vision_profile", lambda: _profile_vision(core, out_dir, name))
    return {r["batch"]: r["tokens_per_s"] for r in report.data["models"][name].get("decode") or []
            if r["cuda_graph"]}


def _hf_rows(path: str, ours: dict[int, float]) -> list[dict]:
    rows = []
    for b in (1, 32):
        row = w.hf_decode(path, b, CONTEXT)
        row["ours_tokens_per_s"] = ours.get(b)
        row["speedup"] = ours[b] / row["tokens_per_s"] if b in ours else None
        rows.append(row)
    return rows


def bench_model(report: Report, name: str, path: str, args: argparse.Namespace) -> None:
    core, startup = _engine(path, vision=name in args.vision, tp=args.tensor_parallel_size)
    report.data["models"][name] = {"path": path, "startup": startup}
    ours = _engine_sections(report, name, core, args)
    core = None  # the engine's memory goes back before transformers loads its copy
    torch.cuda.empty_cache()
    if not args.skip_hf and "hf" in args.sections.split(","):
        report.section(name, "hf_generate", lambda: _hf_rows(path, ours))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--model", action="append", default=[], help="NAME=CHECKPOINT_DIR (repeatable)")
    ap.add_argument("--vision", action="append", default=["3b", "llava7b"],
                    help="models whose vision tower is measured")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the transformers baseline")
    ap.add_argument("--cross-rows", type=int, default=6404,
                    help="cross-attention models: image rows each decoding request reads (default: one "
                         "Llama-3.2-Vision image of 4 tiles x 1601)")
    ap.add_argument("--gemv-configs", default="", help="a `bench.gpu_gemv --sweep` report: also decode with its "
                    "best block configs (section decode_with_swept_gemv_configs)")
    ap.add_argument("--sections", default="decode,variants,profile,prefill,vision,hf",
                    help="comma-separated subset of decode,variants (decode without each fast-path piece),profile,"
                         "prefill,vision,hf")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="run each model over this many GPUs (the roofline then counts the bytes one rank reads)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = Report(args.out, argv)
    report.data["ceilings"] = w.ceilings()
    print("ceilings:", report.data["ceilings"], flush=True)
    report.save()
    for spec in args.model:
        name, _, path = spec.partition("=")
        bench_model(report, name, path, args)
    report.save()
    print(json.dumps(report.data["errors"] or "no errors"))
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
