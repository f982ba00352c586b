"""Routed experts on one GPU: EPD's Triton grouped GEMMs (`epd.kernels.moe.grouped_experts_fused`)
against a per-expert loop of cuBLAS GEMMs (torch matmuls, one pair per expert that has tokens), at
a mixture-of-experts layer's shapes (default: 16 experts of hidden 5120 and width 8192, top-1, bf16,
as Llama-4-Scout), for decode's few tokens and a prefill's thousands:

    python3 -m bench.gpu_moe --out moe.json [--tokens 1,8,32,128,512,2048] [--top-k 1]

Routing is uniform at random (random router logits, top-k). For each token count: the median time
of each path (CUDA events, after warm-up), the bytes of the experts the tokens picked (each picked
expert's weights read once) over that time, and the GEMMs' FLOPs over that time; both paths' outputs
are compared (relative error) so a fast wrong kernel shows.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.device_timing import median_ms
from epd.kernels.moe import grouped_experts_fused


def per_expert_loop(x: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """The baseline: for each expert with tokens, its tokens' rows through two cuBLAS GEMMs."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for expert in torch.unique(ids).tolist():
        token, pick = (ids == expert).nonzero(as_tuple=True)
        rows = x[token] * scores[token, pick, None]
        gate, up = (rows @ gate_up[expert]).chunk(2, dim=-1)
        out.index_add_(0, token, ((F.silu(gate) * up) @ down[expert]).float())
    return out.to(x.dtype)


def measure(tokens: int, top_k: int, gate_up: torch.Tensor, down: torch.Tensor, repeats: int) -> dict:
    experts, hidden, width2 = gate_up.shape
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    top, ids = torch.topk(torch.randn(tokens, experts, device="cuda", generator=gen), top_k, dim=1)
    scores = torch.sigmoid(top).bfloat16()
    fused = grouped_experts_fused(x, scores, ids, gate_up, down)
    loop = per_expert_loop(x, scores, ids, gate_up, down)
    rel = ((fused.float() - loop.float()).norm() / loop.float().norm()).item()
    picked = torch.unique(ids).numel()
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    nbytes = picked * expert_bytes + 2 * x.numel() * x.element_size()
    flops = 2 * tokens * top_k * hidden * (width2 + width2 // 2)
    row = {"tokens": tokens, "top_k": top_k, "experts_picked": picked, "bytes": nbytes, "flops": flops,
           "relative_error": rel}
    for name, fn in (("fused", lambda: grouped_experts_fused(x, scores, ids, gate_up, down)),
                     ("loop", lambda: per_expert_loop(x, scores, ids, gate_up, down))):
        ms = median_ms(fn, repeats, warmup=3)
        row[f"{name}_ms"] = ms
        row[f"{name}_gbps"] = nbytes / ms / 1e6
        row[f"{name}_tflops"] = flops / ms / 1e9
    row["speedup"] = row["loop_ms"] / row["fused_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="1,8,32,128,512,2048")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    e, h, i = args.experts, args.hidden, args.intermediate
    gate_up = (torch.randn(e, h, 2 * i, device="cuda", generator=gen) * h ** -0.5).bfloat16()
    down = (torch.randn(e, i, h, device="cuda", generator=gen) * i ** -0.5).bfloat16()
    rows = [measure(int(t), args.top_k, gate_up, down, args.repeats) for t in args.tokens.split(",")]
    result = {"device": torch.cuda.get_device_name(), "experts": e, "hidden": h, "intermediate": i, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'tokens':>6} {'picked':>6} {'fused ms':>9} {'GB/s':>7} {'TFLOP/s':>7} {'loop ms':>8} {'GB/s':>7} "
          f"{'TFLOP/s':>7} {'speedup':>7} {'rel err':>8}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['experts_picked']:>6} {r['fused_ms']:>9.3f} {r['fused_gbps']:>7.0f} "
              f"{r['fused_tflops']:>7.1f} {r['loop_ms']:>8.3f} {r['loop_gbps']:>7.0f} {r['loop_tflops']:>7.1f} "
              f"{r['speedup']:>7.2f} {r['relative_error']:>8.4f}")


if __name__ == "__main__":
    main()
