"""Every Triton kernel of the GPU fast path compiles for a Hopper GPU (sm90), on this CPU machine,
with the constants the 3b/7b presets launch it with; and a decoder on the decode GEMV path
computes what the torch modules compute (in Triton's interpreter, `triton_interpreted.py`).
Skipped where Triton is not installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from epd.kernels import cross_decode as cd  # noqa: E402
from epd.kernels import decode_gemv as g  # noqa: E402
from epd.kernels import fused_ops as fo  # noqa: E402
from epd.kernels import moe  # noqa: E402
from epd.kernels import split_kv_decode as skv  # noqa: E402
from kv_transfer import cuda_ipc  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
GEMV = {"x_ptr": "*bf16", "w_ptr": "*bf16", "parts_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
        "K_PER_SPLIT": "i32"}
GEMV_CONSTANTS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "FIRST_K": 256, "PREFETCH": True, "USE_GDC": True}
ROTARY = {"bias_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "q_ptr": "*bf16", "cache_ptr": "*bf16",
          "slot_ptr": "*i64"}

KERNELS = {  # name: (kernel, argument types, constants, warps, stages)
    "gemv": (g._gemv_kernel, GEMV, GEMV_CONSTANTS, 4, 4),
    "silu_mul_gemv": (g._silu_mul_gemv_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "INTER": "i32", "K": "i32"},
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "USE_GDC": True}, 4, 4),
    "add_rms_norm": (fo._add_rms_norm_kernel, {
        "x_ptr": "*bf16", "d_ptr": "*fp32", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_ptr": "*bf16", "t": "i32",
        "n": "i32", "eps": "fp32"}, {"HAS_DELTA": True, "PARTS": 4, "BLOCK": 2048, "USE_GDC": True}, 8, 3),
    "rotary_qk": (fo._rotary_qk_kernel, {
        "qkv_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "q_ptr": "*bf16", "row_stride": "i32",
        "cs_stride": "i32", "hq": "i32"}, {"HALF": 64, "USE_GDC": False}, 1, 3),
    "rotary_qk_store_kv": (fo._rotary_qk_store_kv_kernel, {
        "qkv_ptr": "*fp32", **ROTARY, "row_stride": "i32", "cs_stride": "i32", "hq": "i32", "hk": "i32",
        "page_size": "i32", "T": "i32"}, {"HALF": 64, "PARTS": 4, "HAS_BIAS": True, "USE_GDC": True}, 1, 3),
    "rotary_qkv_split": (fo._rotary_qkv_split_kernel, {
        "qkv_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16", "row_stride": "i32",
        "cs_stride": "i32", "S": "i32", "heads": "i32"}, {"HALF": 40, "BLOCK": 64, "ROWS": 64, "USE_GDC": False},
        4, 3),
    "silu_mul": (fo._silu_mul_kernel, {"gu_ptr": "*bf16", "out_ptr": "*bf16", "inter": "i32", "row_stride": "i32"},
                 {"BLOCK": 1024, "USE_GDC": False}, 4, 3),
    "store_kv": (fo._store_kv_kernel, {
        "cache_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "slot_ptr": "*i64", "k_stride": "i32",
        "v_stride": "i32", "page_size": "i32", "width": "i32"}, {"BLOCK": 256, "USE_GDC": False}, 4, 3),
    "split_kv": (skv._split_kv_kernel, {
        "q_ptr": "*bf16", "cache_ptr": "*bf16", "indices_ptr": "*i32", "rows_ptr": "*i32", "part_ptr": "*fp32",
        "lse_ptr": "*fp32", "scale_log2": "fp32", "B": "i32", "SPLITS": "i32", "page_stride": "i32",
        "chunk": "i32"},
        {"HQ": 16, "HK": 2, "GROUP": 8, "GROUP_PAD": 16, "D": 128, "PS": 16, "BLOCK_T": 16, "USE_GDC": True}, 4, 2),
    "cross_decode": (cd._cross_decode_kernel, {
        "q_ptr": "*bf16", "cache_ptr": "*bf16", "pages_ptr": "*i32", "meta_ptr": "*i32", "segs_ptr": "*i32",
        "part_ptr": "*fp32", "lse_ptr": "*fp32", "scale_log2": "fp32", "B": "i32", "SPLITS": "i32",
        "page_stride": "i32"},
        {"HQ": 32, "HK": 8, "GROUP": 4, "GROUP_PAD": 16, "D": 128, "RPP": 64, "BLOCK_T": 16, "USE_GDC": True}, 4, 2),
    "moe_gate_up": (moe._gate_up_kernel, {
        "x_ptr": "*bf16", "score_ptr": "*bf16", "rows_ptr": "*i32", "block_expert_ptr": "*i32", "w_ptr": "*bf16",
        "mid_ptr": "*bf16", "PAIRS": "i32", "H": "i32", "INTER": "i32", "TOP_K": "i32", "w_stride_e": "i32",
        "w_stride_h": "i32"}, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
    "moe_down": (moe._down_kernel, {
        "mid_ptr": "*bf16", "rows_ptr": "*i32", "block_expert_ptr": "*i32", "w_ptr": "*bf16", "out_ptr": "*bf16",
        "PAIRS": "i32", "H": "i32", "INTER": "i32", "w_stride_e": "i32", "w_stride_i": "i32"},
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
    "merge": (skv._merge_kernel, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "SPLITS": "i32"},
              {"D": 128, "BLOCK_D": 32, "SPLITS_PAD": 64, "USE_GDC": True}, 1, 3),
    "copy_pages": (cuda_ipc._copy_pages_kernel, {
        "src0": "*i32", "dst0": "*i32", "src_layer_offs": "*i64", "dst_layer_offs": "*i64", "src_pages": "*i64",
        "dst_pages": "*i64"}, {"PAGE_WORDS": 65536, "BLOCK": 4096}, 4, 3),
}


def _ptx(name: str) -> str:
    kernel, args, constants, warps, stages = KERNELS[name]
    source = ASTSource(fn=kernel, signature={**args, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)
    return triton.compile(source, target=HOPPER, options={"num_warps": warps, "num_stages": stages}).asm["ptx"]


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_hopper(name):
    ptx = _ptx(name)
    assert ".target sm_90" in ptx and ".entry" in ptx
    if KERNELS[name][2].get("USE_GDC"):   # launched with programmatic dependent launch
        assert "griddepcontrol.wait" in ptx


def test_decoder_on_the_gemv_path_equals_the_torch_modules_in_the_interpreter():
    script = os.path.join(os.path.dirname(__file__), "triton_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("close"), done.stderr[-3000:]
