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


def graph_decode_attention() -> None:
    """The CUDA-graph decode attention kernels over a cross-attention family's KV pool (one buffer
    of strided layer views): split-KV self-attention on a token layer's view, and cross attention
    on an image-row layer's view for a request reading two row ranges, one reading one, a request
    without images and a padding row, against the torch paths."""
    from epd.engine.attention.cross import CrossChunk, CrossStep, token_segments, visibility
    from epd.engine.kv_pool import KVCache, KVCacheSpec
    from epd.kernels.cross_decode import CrossGraphDecode
    from epd.kernels.split_kv_decode import split_kv_decode

    kv = KVCache(KVCacheSpec(6, 2, 32, 4, F16, cross_layers=(1, 4)), 40, "cpu")   # 2 slots a cross page
    for layer in kv.layers:
        layer.normal_()
    token, image = kv.layers[0], kv.layers[1]
    q = torch.randn(4, 8, 32, dtype=F16)
    pages = [[7, 3, 9, 12, 5], [20, 21, 30], [11]]
    lens = [19, 9, 2]
    rows = torch.tensor([0, 5, 8, 9, 9, *lens, 1], dtype=torch.int32)   # 3 requests + a padding row
    got = split_kv_decode(q, token, torch.tensor([p for t in pages for p in t] + [0], dtype=torch.int32), rows, 3)
    for i, (table, n) in enumerate(zip(pages, lens, strict=True)):
        ref = CrossStep([CrossChunk(1, table, torch.ones(1, n, dtype=torch.bool))], 4, torch.device("cpu"))
        torch.testing.assert_close(got[i:i + 1], ref.attend(q[i:i + 1], token), atol=2e-3, rtol=2e-3)
    chunked = split_kv_decode(q, token, torch.tensor([p for t in pages for p in t] + [0], dtype=torch.int32), rows, 3,
                              chunk=8)   # a chunked local attention layer: each row reads its own chunk
    for i, (table, n) in enumerate(zip(pages, lens, strict=True)):
        own = torch.zeros(1, n, dtype=torch.bool)
        own[0, (n - 1) // 8 * 8:] = True
        ref = CrossStep([CrossChunk(1, table, own)], 4, torch.device("cpu"))
        torch.testing.assert_close(chunked[i:i + 1], ref.attend(q[i:i + 1], token), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(chunked[0], got[0], atol=1e-2), "19 tokens: the chunk cuts"
    # request 0: images of 20 / 12 rows (valid 13 / 12), the token sees both; request 1: one image
    reqs = [([2, 8, 15, 16, 33], [(20, 13), (12, 12)], [(1, -1), (2, -1)]), ([6, 17], [(10, 7)], [(0, -1)]),
            ([], [], [])]
    plan = CrossGraphDecode(4, 2, 16, torch.device("cpu"))
    rows = [(p, *token_segments(r, sp, 4, 6)) for p, r, sp in reqs]
    assert plan.fits(rows) and not plan.fits(rows + [([0] * 10, [], False)]), "the rows it plans fit its pages"
    plan.plan(rows)
    out = plan.attend(q, image)
    for i, (p, r, sp) in enumerate(reqs[:2]):
        visible, sees = visibility(r, sp, 4, 6, 7)
        ref = CrossStep([CrossChunk(1, p, visible, sees)], 8, torch.device("cpu"))
        torch.testing.assert_close(out[i:i + 1], ref.attend(q[i:i + 1], image), atol=2e-3, rtol=2e-3)
    assert plan.mlp_scale.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert not out[2:].any(), "no image rows (or padding): zero"


def routed_experts() -> None:
    """The MoE grouped-GEMM kernels (block layout by expert, padding rows, an expert no token
    picked, widths not a multiple of the blocks) against the per-expert torch loop."""
    from epd.kernels.moe import expert_blocks, grouped_experts_fused
    from epd.models.llama4.moe import grouped_experts

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 32, generator=gen).to(F16)
    ids = torch.tensor([[0, 2], [2, 0], [3, 0], [0, 2], [2, 3], [0, 3], [3, 2]])   # expert 1 unpicked
    scores = torch.rand(7, 2, generator=gen).to(F16)
    gate_up = (torch.randn(4, 32, 2 * 48, generator=gen) * 0.2).to(F16)
    down = (torch.randn(4, 48, 32, generator=gen) * 0.2).to(F16)
    rows, blocks = expert_blocks(ids, 4)
    assert blocks.tolist()[:3] == [0, 2, 3] and set(blocks.tolist()[3:]) == {-1}
    assert sorted(r for r in rows.tolist() if r < 14) == list(range(14))
    got = grouped_experts_fused(x, scores, ids, gate_up, down)
    torch.testing.assert_close(got.float(), grouped_experts(x, scores, ids, gate_up, down).float(),
                               atol=2e-2, rtol=2e-2)


if __name__ == "__main__":
    _numpy2_scalar_index()
    _on_cpu()
    torch.manual_seed(0)
    model()
    graph_decode_attention()
    routed_experts()
    print("close")
