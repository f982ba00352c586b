"""Decode projections alone: the `decode_gemv` kernel against cuBLAS, per layer shape.

    python3 -m bench.gpu_gemv --out $OUT/gemv.json [--sweep]

For q/k/v (fused, with its bias), o_proj, down_proj and gate/up of the 3b and 7b presets and 1, 4 and 8 rows:
the time of one call as part of a CUDA graph that calls it once per layer on that many distinct
weight copies (as a decode step does, so the L2 cache does not hold the weights), for
- `cublas`: F.linear, with the bias for q/k/v (what the model runs without the GEMV path);
- `gemv`: `decode_gemv.project` with its chosen block config, and with `--sweep` every config in
  SWEEP. Its split-K partial sums (and q/k/v's bias) are left for the next kernel to add up, as
  in the model. Also the default config launched without programmatic dependent launch
  (`gemv_without_pdl_us`): in this chain of GEMVs alone PDL costs time, in the model it saves it;
  and with PDL but the first weight tile loaded after the PDL wait (`gemv_without_prefetch_us`).
And the MLP's gate/up with silu*mul (`act` cases): cuBLAS's gate/up GEMM then the silu*mul kernel
(`cublas_us`, the two together), against `decode_gemv.silu_mul_project` (one kernel; with `--sweep`
every config in ACT_SWEEP too). For o_proj and down_proj also the projection with the residual add
and RMSNorm after it: `project` then the `add_rms_norm` kernel (`add_norm_unfused_us`, the two
together) against `decode_gemv.project_add_norm` (`add_norm_fused_us`, one kernel); for q/k/v the
projection with its bias, rotary and the K/V cache write: `project` then the `rotary_qk_store_kv`
kernel (`rotary_unfused_us`) against `decode_gemv.project_rotary_store_kv` (`rotary_fused_us`).
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
from epd.models import decode_gemv as g
from epd.models import fused_ops as fo

PRESETS = {"3b": dict(hidden=2048, inter=11008, heads=16, kv_heads=2, layers=36),
           "7b": dict(hidden=3584, inter=18944, heads=28, kv_heads=4, layers=28)}
SWEEP = [dict(block_n=n, block_k=k, warps=4, stages=s, split=sp)
         for n, k, s, sp in itertools.product((16, 32), (256, 512), (3, 4), (1, 2, 3, 4))]
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
             check, timed) -> list[dict]:
    """Each config (None: the default) timed as `timed(i, config)` on layer i's weights, with the
    error of `check(config)` (the rounded result on layer 0's) against `ref`."""
    out = []
    for cfg in configs:
        try:
            got = check(cfg).double()
        except triton.runtime.errors.OutOfResources:   # the config's tiles do not fit shared memory
            continue
        err = ((got - ref).norm() / ref.norm()).item()
        us = _graph_us(lambda i, c=cfg: timed(i, c), layers)
        out.append({"config": cfg or default, "us": us, "rel_err": err})
    return out


def _case(rows: int, n: int, k: int, layers: int, configs: list[dict | None], bias: bool,
          heads: tuple[int, int]) -> dict:
    """One projection (q/k/v when `bias`, of `heads` = (query, KV) heads) at `rows` rows."""
    weights = [torch.randn(n, k, device="cuda", dtype=BF16) * k ** -0.5 for _ in range(layers)]
    biases = [torch.randn(n, device="cuda", dtype=BF16) if bias else None for _ in range(layers)]
    x = torch.randn(rows, k, device="cuda", dtype=BF16)
    out = {"rows": rows, "weight_MB": n * k * 2 / 1e6,
           "cublas_us": _graph_us(lambda i: F.linear(x, weights[i], biases[i]), layers),
           "gemv": _configs(configs, g.block_config(n, k), layers, F.linear(x, weights[0]).double(),
                            lambda c: g.linear(x, weights[0], c), lambda i, c: g.project(x, weights[i], c))}
    # the default config launched without programmatic dependent launch, and with PDL but the first
    # weight tile loaded after the wait
    out["gemv_without_pdl_us"] = _without(fo, "PDL", lambda: _graph_us(lambda i: g.project(x, weights[i]), layers))
    out["gemv_without_prefetch_us"] = _without(g, "PREFETCH_WEIGHTS",
                                               lambda: _graph_us(lambda i: g.project(x, weights[i]), layers))
    if not bias:   # o_proj, down_proj: into the residual stream, then the next norm
        resid, norm_w = torch.randn(rows, n, device="cuda", dtype=BF16), torch.rand(n, device="cuda", dtype=BF16)
        out["add_norm_unfused_us"] = _graph_us(
            lambda i: fo.add_rms_norm(resid, g.project(x, weights[i]), norm_w, 1e-6), layers)
        out["add_norm_fused_us"] = _graph_us(lambda i: g.project_add_norm(x, weights[i], resid, norm_w, 1e-6), layers)
    else:          # q/k/v: bias, rotary and the K/V cache write
        out.update(_rotary_us(x, weights, biases, layers, *heads))
    return out


def _rotary_us(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], layers: int,
               hq: int, hk: int) -> dict:
    """q/k/v + bias + rotary + K/V write (hq query and hk KV heads of 128): the GEMV then
    `rotary_qk_store_kv`, against the one-kernel form."""
    rows, d = x.shape[0], 128
    ang = torch.rand(rows, d // 2, device="cuda") * 100
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(BF16) for f in (torch.cos, torch.sin))
    cache = torch.zeros(64, 2, 16, hk, d, device="cuda", dtype=BF16)
    slots = torch.arange(rows, device="cuda") * 16 + 3
    return {"rotary_unfused_us": _graph_us(lambda i: fo.rotary_qk_store_kv(
                g.project(x, weights[i]), cos, sin, hq, hk, cache, slots, bias=biases[i]), layers),
            "rotary_fused_us": _graph_us(lambda i: g.project_rotary_store_kv(
                x, weights[i], biases[i], cos, sin, hq, hk, cache, slots), layers)}


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
    best = min(case["gemv"], key=lambda c: c["us"])
    no_pdl = f"{case['gemv_without_pdl_us']:6.1f} us" if "gemv_without_pdl_us" in case else "-"
    no_prefetch = f"{case['gemv_without_prefetch_us']:6.1f} us" if "gemv_without_prefetch_us" in case else "-"
    print(f"{name} {proj:<7} rows={case['rows']} cuBLAS {case['cublas_us']:6.1f} us ({gbps / bw:4.0%}) | "
          f"gemv default {case['gemv'][0]['us']:6.1f} us "
          f"({case['weight_MB'] * 1e3 / case['gemv'][0]['us'] / bw:4.0%}) "
          f"best {best['us']:6.1f} us {best['config']} err {best['rel_err']:.1e} | without PDL {no_pdl}"
          f" | without prefetch {no_prefetch}" + (
              f" | + add/norm: 2 kernels {case['add_norm_unfused_us']:6.1f} us,"
              f" fused {case['add_norm_fused_us']:6.1f} us"
              if "add_norm_fused_us" in case else "")
          + (f" | + rotary/KV: 2 kernels {case['rotary_unfused_us']:6.1f} us, fused {case['rotary_fused_us']:6.1f} us"
             if "rotary_fused_us" in case else ""),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_gemv", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true", help="also time every block config in SWEEP and ACT_SWEEP")
    ap.add_argument("--only", default="", help="comma-separated projections to time (qkv,o_proj,down,act)")
    args = ap.parse_args(argv)
    bw = w.ceilings()["d2d_copy_GBps"]
    report = {"schema": "epd.gpu_gemv/1", "d2d_copy_GBps": bw, "cases": []}
    configs = [None] + (SWEEP if args.sweep else [])
    act_configs = [None] + (ACT_SWEEP if args.sweep else [])
    for name, p in PRESETS.items():
        for proj, (n, k) in [*_shapes(p).items(), ("act", (p["inter"], p["hidden"]))]:
            if args.only and proj not in args.only.split(","):
                continue
            for rows in (1, 4, 8):
                if proj == "act":
                    case = _act_case(rows, n, k, p["layers"], act_configs)
                else:
                    case = _case(rows, n, k, p["layers"], configs, bias=proj == "qkv",
                                 heads=(p["heads"], p["kv_heads"]))
                case.update(model=name, proj=proj)
                _print(name, proj, case, bw)
                report["cases"].append(case)
                write_json(args.out, report)
    print(json.dumps({"cases": len(report["cases"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
