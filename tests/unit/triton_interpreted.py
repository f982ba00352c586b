"""The decode GEMV kernels' fused tails against the separate kernels they replace, run by Triton's
interpreter on the CPU (fp16: the interpreter has no bf16). Run as a script, in its own process,
because the interpreter is chosen when the kernels are defined:

    TRITON_INTERPRET=1 python tests/unit/triton_interpreted.py add_norm|rotary|model

Each case exits 0 when the fused kernel gives the separate kernels' results bit for bit, and every
arrival counter is back to zero after every launch. The interpreter runs a kernel's programs one
after another, so this checks the tails' arithmetic and indexing, not their memory ordering (the
PTX check in test_triton_kernels.py and tests/gpu do that). `fused_path` is widened to CPU tensors
for the run, and programmatic dependent launch is off.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import triton.runtime.interpreter as interpreter  # noqa: E402

from epd.attention.base import StepMetadata  # noqa: E402
from epd.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from epd.config import TextConfig  # noqa: E402
from epd.models import decode_gemv as g  # noqa: E402
from epd.models import fused_ops as fo  # noqa: E402
from epd.models.qwen2_vl_text import Qwen2VLLanguageModel  # noqa: E402

F16 = torch.float16
ARRIVALS = torch.zeros(64, dtype=torch.int32)


def _numpy2_scalar_index() -> None:
    """The interpreter turns a scalar into an index with int() of a one-element 1-d array, which
    NumPy 2 refuses; take the element instead."""
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _on_cpu() -> None:
    fo.fused_path = g.fused_path = lambda x: x.dtype in (torch.float16, torch.bfloat16)
    fo.pdl = lambda x: False
    g._arrivals = lambda device: ARRIVALS


def add_norm() -> None:
    for rows, k, n, split in [(1, 512, 96, 4), (3, 300, 72, 3), (8, 256, 64, 1)]:
        h = torch.randn(rows, k, dtype=F16)
        w = (torch.randn(n, k) * k ** -0.5).to(F16)
        x = torch.randn(rows, n, dtype=F16)
        norm_w = (torch.rand(n) + 0.5).to(F16)
        cfg = dict(block_n=16, block_k=64, warps=4, stages=2, split=split)
        res, out = g.project_add_norm(h, w, x, norm_w, 1e-6, config=cfg)
        assert not ARRIVALS.any()
        ref_res, ref_out = fo.add_rms_norm(x, g.project(h, w, config=cfg), norm_w, 1e-6)
        assert torch.equal(res, ref_res) and torch.equal(out, ref_out), (rows, k, n)


def rotary() -> None:
    for rows, hq, hk, d, k, split, bias in [(1, 4, 2, 32, 256, 4, True), (3, 2, 1, 16, 200, 3, True),
                                            (8, 4, 2, 32, 128, 1, False)]:
        n = (hq + 2 * hk) * d
        x = torch.randn(rows, k, dtype=F16)
        w = (torch.randn(n, k) * k ** -0.5).to(F16)
        b = torch.randn(n, dtype=F16) if bias else None
        angle = torch.randn(rows, d // 2)
        cos, sin = (torch.cat([f(angle)] * 2, -1).to(F16) for f in (torch.cos, torch.sin))
        slots = torch.tensor([5, 9, 2, 7, 11, 0, 3, 14][:rows])
        cfg = dict(block_n=16, block_k=64, warps=4, stages=2, split=split)
        cache, ref_cache = (torch.full((4, 2, 4, hk, d), float("nan"), dtype=F16) for _ in range(2))
        q = g.project_rotary_store_kv(x, w, b, cos, sin, hq, hk, cache, slots, config=cfg)
        assert not ARRIVALS.any()
        ref_q = fo.rotary_qk_store_kv(g.project(x, w, config=cfg), cos, sin, hq, hk, ref_cache, slots, bias=b)
        assert torch.equal(q, ref_q), (rows, hq, hk)
        assert torch.equal(cache.nan_to_num(7.0), ref_cache.nan_to_num(7.0)), (rows, hq, hk)


class _ModelWritesKV(TorchAttentionBackend):
    """The torch backend, but the model writes K/V itself (as under the CUDA-graph backends)."""

    def kv_write_slots(self) -> torch.Tensor:
        return self._meta.write_slots

    def attend(self, q, k, v, kv_cache):
        if k is None:   # read back what the model wrote, so the parent's store changes nothing
            ps, slots = kv_cache.shape[2], self._meta.write_slots
            k, v = kv_cache[slots // ps, 0, slots % ps], kv_cache[slots // ps, 1, slots % ps]
        return super().attend(q, k, v, kv_cache)


def _steps(model: Qwen2VLLanguageModel, fused_tails: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A 5-token prefill and three decode steps (every step <= 8 rows: the GEMV path)."""
    g.FUSED_ADD_NORM = g.FUSED_ROTARY = fused_tails
    caches = [torch.zeros(4, 2, 4, 2, 32, dtype=F16) for _ in model.language_model.layers]
    backend, outs = _ModelWritesKV(), []
    backend.plan(StepMetadata([5], [5], [[0, 1]], 4, torch.arange(5)))
    outs.append(model(model.embed(torch.tensor([3, 14, 15, 9, 26])), torch.arange(5).expand(3, 5), backend, caches))
    for step in range(3):
        t = 5 + step
        backend.plan(StepMetadata([1], [t + 1], [[0, 1]], 4, torch.tensor([t])))
        outs.append(model(model.embed(torch.tensor([step + 1])), torch.full((3, 1), t), backend, caches))
    assert not ARRIVALS.any()
    return torch.cat(outs), torch.stack(caches)


def model() -> None:
    """The whole decoder with the fused tails against the same fused model without them, bit for
    bit, and against the unfused torch modules to fp16 rounding (head_dim 32: a multiple of the
    GEMV's 32 columns a program, so the rotary tail applies)."""
    cfg = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, mrope_section=(4, 6, 6),
                     max_position_embeddings=64, tie_word_embeddings=False)
    lm = Qwen2VLLanguageModel(cfg).to(F16)
    for p in lm.parameters():
        p.data.normal_(0, 0.3)
    plain = copy.deepcopy(lm)
    lm.fuse_projections()
    hidden, caches = _steps(lm, True)
    ref_hidden, ref_caches = _steps(copy.deepcopy(lm), False)
    assert torch.equal(hidden, ref_hidden) and torch.equal(caches, ref_caches)
    plain_hidden, plain_caches = _steps(plain, True)
    torch.testing.assert_close(hidden, plain_hidden, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(caches, plain_caches, atol=1e-2, rtol=1e-2)


if __name__ == "__main__":
    _numpy2_scalar_index()
    _on_cpu()
    torch.manual_seed(0)
    {"add_norm": add_norm, "rotary": rotary, "model": model}[sys.argv[1]]()
    print("equal")
