"""A decoder on the decode GEMV path (q/k/v, o_proj, gate/up and down_proj as the `decode_gemv`
kernels, their split-K partial sums added up by the rotary and add + norm kernels) against the same
decoder on torch's matmuls, run by Triton's interpreter on the CPU (fp16: the interpreter has no
bf16). Run as a script, in its own process, because the interpreter is chosen when the kernels are
defined:

    TRITON_INTERPRET=1 python tests/unit/triton_interpreted.py

Exits 0 and prints "close" when the hidden states and the K/V caches agree to fp16 rounding.
`fused_path` is widened to CPU tensors for the run, and programmatic dependent launch is off.
"""

from __future__ import annotations

import copy
import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import triton.runtime.interpreter as interpreter  # noqa: E402

from epd.config import TextConfig  # noqa: E402
from epd.engine.attention.base import StepMetadata  # noqa: E402
from epd.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from epd.kernels import decode_gemv as g  # noqa: E402
from epd.kernels import fused_ops as fo  # noqa: E402
from epd.layers.decoder import DecoderLM  # noqa: E402
from epd.models.qwen2_vl.mrope import MRotaryEmbedding  # noqa: E402

F16 = torch.float16


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


class _ModelWritesKV(TorchAttentionBackend):
    """The torch backend, but the model writes K/V itself (as under the CUDA-graph backends)."""

    def kv_write_slots(self) -> torch.Tensor:
        return self._meta.write_slots

    def attend(self, q, k, v, kv_cache):
        if k is None:   # read back what the model wrote, so the parent's store changes nothing
            ps, slots = kv_cache.shape[2], self._meta.write_slots
            k, v = kv_cache[slots // ps, 0, slots % ps], kv_cache[slots // ps, 1, slots % ps]
        return super().attend(q, k, v, kv_cache)


def _steps(model: DecoderLM, gemv: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A 5-token prefill and three decode steps (every step <= 8 rows: the GEMV path when `gemv`)."""
    g.MAX_ROWS = 8 if gemv else 0
    caches = [torch.zeros(4, 2, 4, 2, 32, dtype=F16) for _ in model.language_model.layers]
    backend, outs = _ModelWritesKV(), []
    backend.plan(StepMetadata([5], [5], [[0, 1]], 4, torch.arange(5)))
    outs.append(model(model.embed(torch.tensor([3, 14, 15, 9, 26])), torch.arange(5).expand(3, 5), backend, caches))
    for step in range(3):
        t = 5 + step
        backend.plan(StepMetadata([1], [t + 1], [[0, 1]], 4, torch.tensor([t])))
        outs.append(model(model.embed(torch.tensor([step + 1])), torch.full((3, 1), t), backend, caches))
    return torch.cat(outs), torch.stack(caches)


def model() -> None:
    """The decoder with fused q/k/v and gate/up on the GEMV path, against itself and against the
    unfused modules on torch's matmuls, to fp16 rounding (head_dim 32)."""
    cfg = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=True)
    lm = DecoderLM(cfg, MRotaryEmbedding(32, 10000.0, (4, 6, 6)), position_rows=3).to(F16)
    for p in lm.parameters():
        p.data.normal_(0, 0.3)
    plain = copy.deepcopy(lm)
    lm.fuse_projections()
    hidden, caches = _steps(lm, True)
    for ref_hidden, ref_caches in (_steps(copy.deepcopy(lm), False), _steps(plain, False)):
        torch.testing.assert_close(hidden, ref_hidden, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(caches, ref_caches, atol=1e-2, rtol=1e-2)


if __name__ == "__main__":
    _numpy2_scalar_index()
    _on_cpu()
    torch.manual_seed(0)
    model()
    print("close")
