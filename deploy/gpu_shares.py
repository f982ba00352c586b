"""How `epd serve` splits one GPU between the nodes it starts on it.

Each prefill and decode node sizes its KV pool from its `--gpu-memory-utilization` share of the
GPU's total memory (vLLM's meaning: weights, activations and KV of that process); without shares
each would size its pool from the memory free when it looks, at the same moment as the others,
and one of them would run out. So, unless the user gave `--gpu-memory-utilization` or
`--kv-cache-tokens` (then they decide), `epd serve` on a GPU gives every prefill and decode node a
share of `TOTAL` of the GPU, after `ENCODER_SHARE` for each encoder (its vision tower and a batch
of images; it keeps no KV): decode nodes `DECODE_WEIGHT` of the rest, prefill nodes the other part
(decode holds each request's KV for its whole answer, prefill only until it is handed over);
colocated nodes an equal part each, the split pools together one such part.
The shares are printed at start-up.
"""

from __future__ import annotations

TOTAL = 0.90            # of the GPU, for every node together (the rest: CUDA contexts, fragmentation)
ENCODER_SHARE = 0.08    # counted for each encoder node, which takes what it needs from it
DECODE_WEIGHT = 0.6     # decode nodes' part of what the encoders leave


def gpu_shares(encoders: int, prefills: int, decodes: int, colocated: int = 0) -> dict[str, float]:
    """{"prefill": share of one prefill node, "decode": of one decode node, "colocated": of one
    colocated node} (of the GPU's total memory), for all these nodes on one GPU. A colocated node
    (vision tower, weights and KV of its own) counts as much as the split pools together."""
    left = TOTAL - ENCODER_SHARE * encoders
    if left <= 0.2:
        raise ValueError(f"{encoders} encoder nodes leave too little of one GPU for the prefill and decode "
                         "nodes; give the nodes --gpu-memory-utilization yourself")
    split = 1 if prefills or decodes else 0
    per_unit = left / (colocated + split)
    if not prefills or not decodes:
        weight = {"prefill": 1.0 if prefills else 0.0, "decode": 1.0 if decodes else 0.0}
    else:
        weight = {"prefill": 1.0 - DECODE_WEIGHT, "decode": DECODE_WEIGHT}
    counts = {"prefill": prefills, "decode": decodes}
    out = {role: round(per_unit * weight[role] / counts[role], 3) for role in ("prefill", "decode") if counts[role]}
    if colocated:
        out["colocated"] = round(per_unit, 3)
    return out


def user_sized(engine_args: list[str]) -> bool:
    """Whether the user sized the KV pools (then `epd serve` gives no shares)."""
    return any(a.split("=")[0] in ("--gpu-memory-utilization", "--kv-cache-tokens", "--mem-fraction")
               for a in engine_args)


def describe(shares: dict[str, float], encoders: int, total_bytes: int) -> str:
    gib = total_bytes / 2**30
    parts = [f"{role} {share:.3f} ({share * gib:.1f} GiB) each" for role, share in shares.items()]
    if encoders:
        parts.append(f"encoders what their vision tower needs (about {ENCODER_SHARE:.2f} counted each)")
    return f"GPU memory shares of {gib:.0f} GiB: " + "; ".join(parts)
