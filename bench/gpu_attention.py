"""Paged decode attention alone: our split-KV Triton kernels (what CUDA graphs capture) against
flashinfer's tensor-core and CUDA-core decode kernels, in CUDA graphs, for the 3b and 7b layouts.

    python3 -m bench.gpu_attention --out attn.json [--splits 8,16,32,64]

Each case: `batch` requests of `context` tokens on randomly ordered pages of 16 tokens, one layer,
bf16, head_dim 128; a CUDA graph of `layers` back-to-back attention calls (as in one decode step) is
replayed and timed with CUDA events; reported per call in microseconds, with the KV bytes read per
second, and the error against a float32 reference. `--splits` also times the split-KV kernels with
each given split count instead of `splits_for`'s choice (kernel "split_kv/N").
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import gpu_workloads as w
from bench.report import write_json

LAYOUTS = {"3b": (16, 2), "7b": (28, 4)}   # (query heads, KV heads)
HEAD_DIM, PAGE = 128, 16


def _flashinfer(tensor_cores: bool, q, cache, order, indptr, last, hq, hk):
    import flashinfer

    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=indptr.clone(), paged_kv_indices_buffer=order.clone(),
        paged_kv_last_page_len_buffer=last.clone())
    wrapper.plan(indptr, order, last, hq, hk, HEAD_DIM, PAGE, q_data_type=torch.bfloat16,
                 kv_data_type=torch.bfloat16)
    return lambda: wrapper.run(q, cache)


def _split_kv(q, cache, order, indptr, batch, context, hk, splits: int | None):
    from epd.kernels.split_kv_decode import split_kv_decode, splits_for

    rows = torch.cat([indptr, torch.full((batch,), context, dtype=torch.int32, device="cuda")])
    if splits is None:
        splits = splits_for(batch, hk, torch.cuda.get_device_properties(0).multi_processor_count)
    return lambda: split_kv_decode(q, cache, order, rows, splits)


def case(layout: str, batch: int, context: int, kernel: str, calls: int = 28) -> dict:
    """kernel: flashinfer_tc (flashinfer's tensor-core decode), flashinfer_cc (its CUDA-core
    kernel), split_kv (ours, what CUDA graphs capture by default) or split_kv/N (ours, N splits)."""
    hq, hk = LAYOUTS[layout]
    pages_per = -(-context // PAGE)
    num_pages = batch * pages_per + 1
    cache = torch.randn(num_pages, 2, PAGE, hk, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    order = torch.randperm(num_pages - 1, device="cuda").int() + 1
    indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * pages_per
    last = torch.full((batch,), context - (pages_per - 1) * PAGE, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    if kernel.startswith("split_kv"):
        splits = int(kernel.split("/")[1]) if "/" in kernel else None
        run = _split_kv(q, cache, order, indptr, batch, context, hk, splits)
    else:
        run = _flashinfer(kernel == "flashinfer_tc", q, cache, order, indptr, last, hq, hk)
    ref = _reference(q, cache, order, batch, pages_per, context, hq, hk)
    err = float((run().float() - ref).norm() / ref.norm())
    us = w.graph_us_per_call(run, calls)
    kv_bytes = batch * context * 2 * hk * HEAD_DIM * 2
    return {"layout": layout, "batch": batch, "context": context, "kernel": kernel,
            "us_per_call": round(us, 2), "kv_GBps": round(kv_bytes / us / 1e3, 1), "rel_error": err}


def _reference(q, cache, order, batch, pages_per, context, hq, hk) -> torch.Tensor:
    outs = []
    for b in range(batch):
        pages = order[b * pages_per:(b + 1) * pages_per].long()
        kv = cache[pages].float()                                   # [pages, 2, PAGE, hk, D]
        k = kv[:, 0].reshape(-1, hk, HEAD_DIM)[:context].repeat_interleave(hq // hk, dim=1)
        v = kv[:, 1].reshape(-1, hk, HEAD_DIM)[:context].repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].float(), k) / HEAD_DIM ** 0.5
        outs.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
    return torch.stack(outs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--splits", default="", help="comma-separated split counts to time as well")
    args = ap.parse_args(argv)
    kernels = ["split_kv", "flashinfer_tc", "flashinfer_cc"] + [f"split_kv/{n}" for n in args.splits.split(",") if n]
    rows = []
    for layout in LAYOUTS:
        for batch in (int(x) for x in args.batches.split(",")):
            for kernel in kernels:
                try:
                    rows.append(case(layout, batch, args.context, kernel))
                except RuntimeError as e:   # e.g. the CUDA-core kernel has no GQA group of 7 (7b)
                    rows.append({"layout": layout, "batch": batch, "kernel": kernel, "error": str(e)[-80:]})
                print(json.dumps(rows[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name(), "rows": rows}
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
