"""Llama 4's grouped MoE feed-forward against transformers' `Llama4TextMoe` with the same weights:
equal in float32 for 1, 7 and 64 tokens with top-1 and top-2 routing, close in bf16; the router's
sigmoid score scales each token's input to its expert (not the expert's output); experts no token
picked are never multiplied."""

from __future__ import annotations

import pytest
import torch

from epd.config import TextConfig
from epd.models.llama4.moe import Llama4MoE, grouped_experts, route

HIDDEN, EXPERT_WIDTH, NUM_EXPERTS = 48, 80, 6


def _hf_moe(top_k: int, seed: int = 0):
    """transformers' MoE block with every weight drawn at O(1)-preserving scales."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=EXPERT_WIDTH, num_local_experts=NUM_EXPERTS,
                              num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=12)
    moe = Llama4TextMoe(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moe.parameters():
            fan_in = param.shape[-2] if param.dim() == 3 else param.shape[-1]
            param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
    return moe


def _ours(hf_moe, top_k: int) -> Llama4MoE:
    cfg = TextConfig(vocab_size=16, hidden_size=HIDDEN, intermediate_size=EXPERT_WIDTH, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=12, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=64,
                     tie_word_embeddings=False)
    moe = Llama4MoE(cfg, NUM_EXPERTS, top_k)
    moe.load_state_dict(hf_moe.state_dict())    # the checkpoint's names and layout, as stored
    return moe.eval()


def _tokens(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_float32_equals_transformers(top_k: int, num_tokens: int) -> None:
    hf_moe = _hf_moe(top_k)
    ours = _ours(hf_moe, top_k)
    x = _tokens(num_tokens)
    with torch.no_grad():
        expected, _ = hf_moe(x)
        got = ours(x)
    assert got.shape == (num_tokens, HIDDEN)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_bf16_stays_near_transformers(top_k: int) -> None:
    hf_moe = _hf_moe(top_k)
    ours = _ours(hf_moe, top_k)
    x = _tokens(64)
    with torch.no_grad():
        reference, _ = hf_moe(x)
        expected, _ = hf_moe.to(torch.bfloat16)(x.bfloat16())
        got = ours.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    scale = reference.abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2 * scale, rtol=0)
    torch.testing.assert_close(got.float(), reference, atol=3e-2 * scale, rtol=0)


def test_score_scales_the_expert_input() -> None:
    """One token, one expert: the output is expert(sigmoid(logit) * x), which differs from
    sigmoid(logit) * expert(x) because the expert is nonlinear."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, HIDDEN, generator=gen)
    gate_up = torch.randn(1, HIDDEN, 2 * EXPERT_WIDTH, generator=gen) / HIDDEN**0.5
    down = torch.randn(1, EXPERT_WIDTH, HIDDEN, generator=gen) / EXPERT_WIDTH**0.5
    scores, ids = route(torch.tensor([[-0.7]]), 1)
    got = grouped_experts(x, scores, ids, gate_up, down)

    def expert(rows: torch.Tensor) -> torch.Tensor:
        gate, up = (rows @ gate_up[0]).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ down[0]

    score = torch.sigmoid(torch.tensor(-0.7))
    torch.testing.assert_close(got, expert(score * x))
    assert not torch.allclose(got, score * expert(x), atol=1e-3)


def test_unpicked_experts_are_never_multiplied() -> None:
    """The computation is grouped by expert: NaN weights of experts no token picked stay out."""
    hf_moe = _hf_moe(1)
    ours = _ours(hf_moe, 1)
    x = _tokens(5)
    with torch.no_grad():
        expected = ours(x)
        picked = set(route(ours.router(x), 1)[1].flatten().tolist())
        for expert in set(range(NUM_EXPERTS)) - picked:
            ours.experts.gate_up_proj[expert] = float("nan")
            ours.experts.down_proj[expert] = float("nan")
        got = ours(x)
    assert len(picked) < NUM_EXPERTS
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_graph_capturable_dense_path_equals_the_grouped_one(top_k):
    """What a float32 CUDA graph captures (every expert on every token, no host sync) gives the
    grouped path's output, another process's expert id (one past ours) picking nothing."""
    from epd.models.llama4.moe import dense_experts, grouped_experts

    gen = torch.Generator().manual_seed(top_k)
    experts, hidden, inter, tokens = 4, 16, 24, 9
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=gen, dtype=torch.float64)
    down = torch.randn(experts, inter, hidden, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    top, ids = torch.topk(torch.randn(tokens, experts, generator=gen, dtype=torch.float64), top_k, dim=1)
    ids[0, 0] = experts
    got = dense_experts(x, torch.sigmoid(top), ids, gate_up, down)
    torch.testing.assert_close(got, grouped_experts(x, torch.sigmoid(top), ids, gate_up, down))
