"""Llama 4's text model written out in plain torch over a whole prompt (no paged cache): the
reference the paged-KV language model is checked against.

One attention layer, in order:
  q, k, v = projections of the input norm of x          # q [T, Hq, D], k/v [T, Hkv, D]
  RoPE layers: q, k rotated in *interleaved* pairs (x[2i], x[2i+1]) by angle position * inv_freq[i]
               (the complex form x * e^{i theta}), computed in float32; then, with qk_norm, q and k
               RMS-normalized over D without weight (eps = rms_norm_eps), in float32
  NoPE layers: no rotary; with temperature tuning q *= 1 + attn_scale * log(1 + floor((p + 1) / floor_scale)),
               p the token's position in the sequence (0-based), in float32
  softmax(q k^T / sqrt(D)) v over the allowed keys: key position <= query position, and on chunked
               layers the same chunk (position // attention_chunk_size); GQA shares each kv head
               among Hq / Hkv consecutive q heads
  o_proj
Then x += attention; x += feed-forward(post-attention norm of x) (MoE or dense MLP); a final norm
and lm_head give the logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from epd.models.llama4.moe import grouped_experts, route
from epd.models.llama4.text_config import LayerSpec, Llama4TextSpec

TEXT_PREFIX = "language_model.model."


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> (cos, sin) [T, D / 2] in float32."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    return angles.cos(), angles.sin()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]: each pair (x[2i], x[2i+1]) rotated by the angle of frequency i; float32 math,
    the result in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))                          # [T, heads, D / 2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def deinterleave_rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A q_proj / k_proj weight [heads * D, H] with each head's output dims reordered even-first
    (0, 2, ..., D-2, 1, 3, ..., D-1): rotating its q / k in halves, (x[i], x[i + D/2]) by frequency i,
    as the engine's rotary does, then equals the interleaved rotation of the original. Attention is
    unchanged (q and k reordered alike; the QK norm is over all of D), the cached K is reordered."""
    order = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return weight.unflatten(0, (-1, head_dim))[:, order].flatten(0, 1)


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in float32, the result in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def temperature_scales(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """positions [T] (0-based sequence positions) -> q's scale per token [T], float32."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def allowed_keys(positions: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """[T, T] bool: query i may attend key j (causal; within i's chunk when chunk_size is set)."""
    allowed = positions[None, :] <= positions[:, None]
    if chunk_size is not None:
        chunk = positions // chunk_size
        allowed &= chunk[None, :] == chunk[:, None]
    return allowed


def _linear(x: torch.Tensor, weights: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, weights[name + ".weight"], weights.get(name + ".bias"))


def attention_layer(weights: Mapping[str, torch.Tensor], spec: Llama4TextSpec, layer: int,
                    h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One layer's attention block: h [T, H] (the input norm's output), positions [T] -> [T, H].
    `weights` holds the checkpoint's tensors (`language_model.model.layers.N.self_attn.*`)."""
    kind: LayerSpec = spec.layers[layer]
    name = f"{TEXT_PREFIX}layers.{layer}.self_attn."
    t, d = h.shape[0], spec.head_dim
    q = _linear(h, weights, name + "q_proj").view(t, spec.num_heads, d)
    k = _linear(h, weights, name + "k_proj").view(t, spec.num_kv_heads, d)
    v = _linear(h, weights, name + "v_proj").view(t, spec.num_kv_heads, d)
    if kind.uses_rope:
        cos, sin = rope_angles(positions, spec.inv_freq())
        q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
    if kind.qk_norm:
        q, k = weightless_rms_norm(q, spec.rms_norm_eps), weightless_rms_norm(k, spec.rms_norm_eps)
    if kind.temperature_tuned:
        scales = temperature_scales(positions, spec.floor_scale, spec.attn_scale)
        q = (q * scales[:, None, None]).to(q.dtype)
    chunk = spec.attention_chunk_size if kind.uses_chunked_attention else None
    mask = allowed_keys(positions, chunk)
    group = spec.num_heads // spec.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5           # [Hq, T, T]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, -1)
    return _linear(out, weights, name + "o_proj")


def feed_forward(weights: Mapping[str, torch.Tensor], spec: Llama4TextSpec, layer: int,
                 h: torch.Tensor) -> torch.Tensor:
    """One layer's feed-forward: the MoE (grouped experts + shared expert) or the dense MLP."""
    name = f"{TEXT_PREFIX}layers.{layer}.feed_forward."

    def gated_mlp(prefix: str) -> torch.Tensor:
        act = F.silu(_linear(h, weights, prefix + "gate_proj")) * _linear(h, weights, prefix + "up_proj")
        return _linear(act, weights, prefix + "down_proj")

    if not spec.layers[layer].is_moe:
        return gated_mlp(name)
    scores, expert_ids = route(_linear(h, weights, name + "router"), spec.top_k)
    routed = grouped_experts(h, scores, expert_ids, weights[name + "experts.gate_up_proj"],
                             weights[name + "experts.down_proj"])
    return gated_mlp(name + "shared_expert.") + routed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weightless_rms_norm(x, eps) * weight


def reference_text_forward(weights: Mapping[str, torch.Tensor], spec: Llama4TextSpec,
                           input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [T] (one prompt, positions 0..T-1) -> logits [T, vocab]."""
    eps = spec.rms_norm_eps
    positions = torch.arange(input_ids.shape[0])
    x = F.embedding(input_ids, weights[TEXT_PREFIX + "embed_tokens.weight"])
    for layer in range(spec.num_layers):
        name = f"{TEXT_PREFIX}layers.{layer}."
        h = rms_norm(x, weights[name + "input_layernorm.weight"], eps)
        x = x + attention_layer(weights, spec, layer, h, positions)
        h = rms_norm(x, weights[name + "post_attention_layernorm.weight"], eps)
        x = x + feed_forward(weights, spec, layer, h)
    x = rms_norm(x, weights[TEXT_PREFIX + "norm.weight"], eps)
    head = weights.get("language_model.lm_head.weight", weights[TEXT_PREFIX + "embed_tokens.weight"])
    return F.linear(x, head)
