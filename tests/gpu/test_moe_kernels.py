"""The routed-experts Triton kernels on the GPU: bf16 output of the grouped GEMMs against the
per-expert torch loop (decode's few tokens, a prefill's hundreds, top-1 and top-2), and the same
output replayed from a CUDA graph with other tokens and routes (no host sync inside)."""

from __future__ import annotations

import pytest
import torch

from epd.kernels.moe import grouped_experts_fused
from epd.models.llama4.moe import grouped_experts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
E, H, INTER = 16, 1024, 2048


def _weights(gen):
    gate_up = (torch.randn(E, H, 2 * INTER, device="cuda", generator=gen) * H ** -0.5).bfloat16()
    down = (torch.randn(E, INTER, H, device="cuda", generator=gen) * INTER ** -0.5).bfloat16()
    return gate_up, down


def _inputs(gen, tokens: int, top_k: int):
    x = torch.randn(tokens, H, device="cuda", generator=gen).bfloat16()
    logits = torch.randn(tokens, E, device="cuda", generator=gen)
    top, ids = torch.topk(logits, top_k, dim=1)
    return x, torch.sigmoid(top).bfloat16(), ids


def _close(got, ref):
    rel = (got.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1)
    assert rel.max() < 2e-2, f"relative error {rel.max():.4f}"


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (8, 1), (300, 1), (37, 2)])
def test_grouped_gemms_equal_the_per_expert_loop(tokens, top_k):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    gate_up, down = _weights(gen)
    x, scores, ids = _inputs(gen, tokens, top_k)
    _close(grouped_experts_fused(x, scores, ids, gate_up, down), grouped_experts(x, scores, ids, gate_up, down))


def test_grouped_gemms_replay_in_a_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up, down = _weights(gen)
    x, scores, ids = _inputs(gen, 8, 1)
    grouped_experts_fused(x, scores, ids, gate_up, down)   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_experts_fused(x, scores, ids, gate_up, down)
    x2, scores2, ids2 = _inputs(gen, 8, 1)
    x.copy_(x2), scores.copy_(scores2), ids.copy_(ids2)
    graph.replay()
    _close(out, grouped_experts(x2, scores2, ids2, gate_up, down))
