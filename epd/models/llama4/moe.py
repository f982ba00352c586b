"""Llama 4's mixture-of-experts feed-forward: a router, routed experts, and a shared expert.

For each token the router's logits pick the top-k experts; each picked expert's score is the
sigmoid of its logit (not a softmax over the picks), and it scales the token's *input* to that
expert, before the expert's nonlinearity: out = shared(x) + sum_e expert_e(sigmoid(logit_e) * x).

The experts run grouped: the (token, expert) pairs are sorted by expert, and each expert with
tokens does one matmul over its own rows (decode's few tokens touch only their experts' weights).
On a GPU in bf16/fp16 that is `epd.kernels.moe.grouped_experts_fused` (Triton grouped GEMMs, no
host sync, so it can sit in a CUDA graph); elsewhere the per-expert loop below.
The experts' weights keep the checkpoint's batched layout, `gate_up_proj` [E, H, 2I] (gate first)
and `down_proj` [E, I, H], multiplied from the right, so they load as stored. Parameter names are
the checkpoint's below `feed_forward.`: `router.weight`, `experts.gate_up_proj`,
`experts.down_proj`, `shared_expert.{gate,up,down}_proj.weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epd.config import TextConfig
from epd.kernels.fused_ops import fused_path
from epd.kernels.moe import grouped_experts_fused
from epd.layers.mlp import GatedMLP
from epd.layers.parallel import all_reduce, local_size, tp_group


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (scores [T, k] in the logits' dtype, expert ids [T, k]); the sigmoid
    runs in float32."""
    top_logits, expert_ids = torch.topk(router_logits, top_k, dim=1)
    return torch.sigmoid(top_logits.float()).to(router_logits.dtype), expert_ids


def grouped_experts(x: torch.Tensor, scores: torch.Tensor, expert_ids: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """sum over each token's k experts of down(silu(gate) * up) of its score-scaled input.

    x [T, H]; scores, expert_ids [T, k]; gate_up_proj [E, H, 2I]; down_proj [E, I, H] -> [T, H].
    An expert id E (one past this process's experts) picks nothing here.
    """
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)                                 # pair p = (token p // k, pick p % k)
    order = torch.argsort(flat_ids, stable=True)                     # pairs grouped by expert
    token_of_row = order // top_k
    rows = x[token_of_row] * scores.reshape(-1)[order, None]          # [T * k, H], scaled before the expert
    experts = gate_up_proj.shape[0]   # an id of `experts`: another process's expert (its rows stay zero)
    counts = torch.bincount(flat_ids, minlength=experts + 1).tolist()[:experts]
    outputs = torch.zeros_like(rows)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            gate, up = (rows[start:start + count] @ gate_up_proj[expert]).chunk(2, dim=-1)
            outputs[start:start + count] = (F.silu(gate) * up) @ down_proj[expert]
            start += count
    per_pair = torch.empty_like(outputs)
    per_pair[order] = outputs                                         # back to (token, pick) order
    return per_pair.view(num_tokens, top_k, -1).sum(dim=1)


def dense_experts(x: torch.Tensor, scores: torch.Tensor, expert_ids: torch.Tensor,
                  gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """`grouped_experts` without a host sync, for a CUDA graph being captured outside the fused
    kernels' dtypes (float32): every expert runs on every token, whose input is scaled by its score
    for that expert (0 when it did not pick it, which the expert maps to 0), as transformers does."""
    out = torch.zeros_like(x)
    for expert in range(gate_up_proj.shape[0]):
        score = (scores * (expert_ids == expert)).sum(dim=1, keepdim=True)
        gate, up = ((x * score) @ gate_up_proj[expert]).chunk(2, dim=-1)
        out += (F.silu(gate) * up) @ down_proj[expert]
    return out


class RoutedExperts(nn.Module):
    """The experts' weights, in the checkpoint's layout. Under tensor parallelism the experts are
    placed, not split: process r holds experts [r * E / N, (r + 1) * E / N), whole."""

    TP_SHARDS = {"gate_up_proj": 0, "down_proj": 0}

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        num_experts = local_size(num_experts, "the routed experts")
        self.first = tp_group().rank * num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))


class Llama4MoE(nn.Module):
    """x [T, H] -> shared_expert(x) + the routed experts' sum [T, H]."""

    def __init__(self, expert_cfg: TextConfig, num_experts: int, top_k: int) -> None:
        """expert_cfg: the text config with `intermediate_size` set to one expert's width."""
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(expert_cfg.hidden_size, num_experts, bias=False)
        self.experts = RoutedExperts(num_experts, expert_cfg.hidden_size, expert_cfg.intermediate_size)
        self.shared_expert = GatedMLP(expert_cfg, reduce=False)   # summed with the routed experts, then reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, expert_ids = route(self.router(x), self.top_k)
        experts = self.experts
        if tp_group().size > 1:   # this process's experts by local id; the others' as one past them
            local = experts.gate_up_proj.shape[0]
            expert_ids = (expert_ids - experts.first).masked_fill_((expert_ids < experts.first) |
                                                                  (expert_ids >= experts.first + local), local)
        grouped = grouped_experts_fused if fused_path(x) else \
            dense_experts if x.is_cuda and torch.cuda.is_current_stream_capturing() else grouped_experts
        routed = grouped(x, scores, expert_ids, experts.gate_up_proj, experts.down_proj)
        return all_reduce(self.shared_expert(x) + routed)
