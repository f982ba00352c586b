"""Decode projections alone: the `decode_gemv` kernel against cuBLAS, per layer shape.

    python3 -m bench.gpu_gemv --out $OUT/gemv.json [--sweep] [--only qkv,down] [--rows 1,8]

For q/k/v (fused, with its bias), o_proj, down_proj and gate/up of the 3b and 7b presets and 1, 4 and 8 rows:
the time of one call as part of a CUDA graph that calls it once per layer on that many distinct
weight copies (as a decode step does, so the L2 cache does not hold the weights), for
- `cublas`: F.linear, with the bias for q/k/v (what the model runs without the GEMV path);
- `gemv`: `decode_gemv.project` with its chosen block config, and with `--sweep` every config in
  SWEEP. Its split-K partial sums (and q/k/v's bias) are left for the next kernel to add up, as
  in the model; each config is also timed with that next kernel after it (`chain_us`): for
  o_proj and down_proj the residual add + RMSNorm (`add_rms_norm`), for q/k/v the bias, rotary and
  K/V cache write (`rotary_qk_store_kv`), the pair the model runs, so the sweep ranks configs by
  what a decode layer sees. `best_configs` lists the config with the lowest `chain_us` for each
  shape and row count. Also the default config launched without programmatic dependent launch
  (`gemv_without_pdl_us`): in this chain of GEMVs alone PDL costs time, in the model it saves it;
  and with PDL but the first weight tile loaded after the PDL wait (`gemv_without_prefetch_us`).
And the MLP's gate/up with silu*mul (`act` cases): cuBLAS's gate/up GEMM then the silu*mul kernel
(`cublas_us`, the two together), against `decode_gemv.silu_mul_project` (one kernel; with `--sweep`
every config in ACT_SWEEP too).
Bandwidth = weight bytes / time; `pct_copy` against this run's device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F
import triton

from bench import gpu_workloads as w
from bench.report import write_json
from epd.kernels import decode_gemv as g
from epd.kernels import fused_ops as fo

PRESETS = {"3b": dict(hidden=2048, inter=11008, heads=16, kv_heads=2, layers=36),
           "7b": dict(hidden=3584, inter=18944, heads=28, kv_heads=4, layers=28)}
SWEEP = [dict(block_n=n, block_k=k, warps=4, stages=s, split=sp, **({"prefetch_k": pk} if pk > k else {}))
         for n, k, s, sp, pk in itertools.product((32, 64), (64, 128, 256), (3, 4), (2, 4, 8), (0, 256, 512))
         if pk == 0 or pk > k]
ACT_SWEEP = [dict(block_n=n, block_k=k, warps=wp, stages=s)
             for n, k, wp, s in itertools.product((16, 32, 64), (32, 64, 128), (4,), (3, 4, 5))]
BF16 = torch.bfloat16


def _shapes(p: dict) -> dict[str, tuple[int, int]]:
    """projection -> (weight rows N, K)."""
    return {"qkv": ((p["heads"] + 2 * p["kv_heads"]) * 128, p["hidden"]), "o_proj": (p["hidden"], p["heads"] * 128),
            "down": (p["hidden"], p["inter"])}


def _graph_us(fn, layers: int) -> float:
    """Time of one `fn(i)` inside a graph that calls it for i in range(layers), as one decode step."""
    return w.graph_us_per_call(lambda: [fn(i) for i in range(layers)], 1) / layers


def _configs(configs: list[dict | None], default: dict, layers: int, ref: torch.Tensor,
             check, timed, chained=None) -> list[dict]:
    """Each config (None: the default) timed as `timed(i, config)` on layer i's weights (and as
    `chained(i, config)`, the GEMV with the kernel after it, where given), with the error of
    `check(config)` (the rounded result on layer 0's) against `ref`."""
    out = []
    for cfg in configs:
        try:
            got = check(cfg).double()
        except triton.runtime.errors.OutOfResources:   # the config's tiles do not fit shared memory
            continue
        err = ((got - ref).norm() / ref.norm()).item()
        entry = {"config": cfg or default, "us": _graph_us(lambda i, c=cfg: timed(i, c), layers), "rel_err": err}
        if chained is not None:
            entry["chain_us"] = _graph_us(lambda i, c=cfg: chained(i, c), layers)
        out.append(entry)
    return out


def _next_kernel(rows: int, n: int, biases: list[torch.Tensor | None], heads: tuple[int, int]):
    """The kernel the model runs on a projection's partial sums, as f(parts, i): for q/k/v (with
    `biases`) bias + rotary + the K/V cache write, for o_proj / down_proj the residual add + RMSNorm."""
    if biases[0] is None:
        resid, norm_w = torch.randn(rows, n, device="cuda", dtype=BF16), torch.rand(n, device="cuda", dtype=BF16)
        return lambda parts, i: fo.add_rms_norm(resid, parts, norm_w, 1e-6)
    hq, hk, d = *heads, 128
    ang = torch.rand(rows, d // 2, device="cuda") * 100
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(BF16) for f in (torch.cos, torch.sin))
    cache = torch.zeros(64, 2, 16, hk, d, device="cuda", dtype=BF16)
    slots = torch.arange(rows, device="cuda") * 16 + 3
    return lambda parts, i: fo.rotary_qk_store_kv(parts, cos, sin, hq, hk, cache, slots, bias=biases[i])


def _case(rows: int, n: int, k: int, layers: int, configs: list[dict | None], bias: bool,
          heads: tuple[int, int]) -> dict:
    """One projection (q/k/v when `bias`, of `heads` = (query, KV) heads) at `rows` rows."""
    weights = [torch.randn(n, k, device="cuda", dtype=BF16) * k ** -0.5 for _ in range(layers)]
    biases = [torch.randn(n, device="cuda", dtype=BF16) if bias else None for _ in range(layers)]
    x = torch.randn(rows, k, device="cuda", dtype=BF16)
    after = _next_kernel(rows, n, biases, heads)
    out = {"rows": rows, "weight_MB": n * k * 2 / 1e6,
           "cublas_us": _graph_us(lambda i: F.linear(x, weights[i], biases[i]), layers),
           "gemv": _configs(configs, g.block_config(n, k), layers, F.linear(x, weights[0]).double(),
                            lambda c: g.linear(x, weights[0], c), lambda i, c: g.project(x, weights[i], c),
                            lambda i, c: after(g.project(x, weights[i], c), i))}
    # the default config launched without programmatic dependent launch, and with PDL but the first
    # weight tile loaded after the wait
    out["gemv_without_pdl_us"] = _without(fo, "PDL", lambda: _graph_us(lambda i: g.project(x, weights[i]), layers))
    out["gemv_without_prefetch_us"] = _without(g, "PREFETCH_WEIGHTS",
                                               lambda: _graph_us(lambda i: g.project(x, weights[i]), layers))
    return out


def _without(module, flag: str, measure) -> float:
    """`measure()` with `module.flag` off, then on again."""
    setattr(module, flag, False)
    try:
        return measure()
    finally:
        setattr(module, flag, True)


def _act_case(rows: int, inter: int, k: int, layers: int, configs: list[dict | None]) -> dict:
    weights = [torch.randn(2 * inter, k, device="cuda", dtype=BF16) * k ** -0.5 for _ in range(layers)]
    x = torch.randn(rows, k, device="cuda", dtype=BF16)
    return {"rows": rows, "weight_MB": 2 * inter * k * 2 / 1e6,
            "cublas_us": _graph_us(lambda i: fo.silu_and_mul(F.linear(x, weights[i])), layers),
            "gemv": _configs(configs, g.act_config(inter, k), layers,
                             fo.silu_and_mul(F.linear(x, weights[0])).double(),
                             lambda c: g.silu_mul_project(x, weights[0], c),
                             lambda i, c: g.silu_mul_project(x, weights[i], c))}


def _print(name: str, proj: str, case: dict, bw: float) -> None:
    gbps = case["weight_MB"] * 1e3 / case["cublas_us"]
    default = case["gemv"][0]
    best = min(case["gemv"], key=lambda c: c.get("chain_us", c["us"]))
    extra = "".join(f" | {key[:-3].replace('_', ' ')} {case[key]:6.1f} us"
                    for key in ("gemv_without_pdl_us", "gemv_without_prefetch_us") if key in case)
    chain = (f" | with the next kernel: default {default['chain_us']:6.1f} us, best {best['chain_us']:6.1f} us"
             if "chain_us" in default else "")
    print(f"{name} {proj:<7} rows={case['rows']} cuBLAS {case['cublas_us']:6.1f} us ({gbps / bw:4.0%}) | "
          f"gemv default {default['us']:6.1f} us ({case['weight_MB'] * 1e3 / default['us'] / bw:4.0%}) "
          f"best {best['config']} err {best['rel_err']:.1e}{chain}{extra}", flush=True)


def _best_configs(cases: list[dict]) -> list[dict]:
    """For each swept projection case: the config with the lowest time next to its next kernel."""
    out = []
    for case in cases:
        if len(case["gemv"]) > 1 and "chain_us" in case["gemv"][0]:
            best = min(case["gemv"], key=lambda c: c["chain_us"])
            out.append({"model": case["model"], "proj": case["proj"], "shape": case["shape"], "rows": case["rows"],
                        "config": best["config"], "chain_us": best["chain_us"],
                        "default_chain_us": case["gemv"][0]["chain_us"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_gemv", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true", help="also time every block config in SWEEP and ACT_SWEEP")
    ap.add_argument("--only", default="", help="comma-separated projections to time (qkv,o_proj,down,act)")
    ap.add_argument("--rows", default="1,4,8", help="comma-separated row counts")
    args = ap.parse_args(argv)
    bw = w.ceilings()["d2d_copy_GBps"]
    report = {"schema": "epd.gpu_gemv/1", "d2d_copy_GBps": bw, "cases": []}
    configs = [None] + (SWEEP if args.sweep else [])
    act_configs = [None] + (ACT_SWEEP if args.sweep else [])
    for name, p in PRESETS.items():
        for proj, (n, k) in [*_shapes(p).items(), ("act", (p["inter"], p["hidden"]))]:
            if args.only and proj not in args.only.split(","):
                continue
            for rows in map(int, args.rows.split(",")):
                if proj == "act":
                    case = _act_case(rows, n, k, p["layers"], act_configs)
                else:
                    case = _case(rows, n, k, p["layers"], configs, bias=proj == "qkv",
                                 heads=(p["heads"], p["kv_heads"]))
                case.update(model=name, proj=proj, shape=[n, k])
                _print(name, proj, case, bw)
                report["cases"].append(case)
                report["best_configs"] = _best_configs(report["cases"])
                write_json(args.out, report)
    print(json.dumps({"cases": len(report["cases"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
