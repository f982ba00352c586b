"""Variable-length attention for the Qwen2-VL vision towers on GPU: one kernel per layer.

With SDPA, transformers' vision towers split the packed patch sequence at every image and, in
Qwen2.5-VL's windowed layers, at every window, running one SDPA per piece after a host sync
per layer (a 1280x720 image is 84 windows, so ~2,400 small attention calls for 28 windowed
layers). An attention implementation whose name contains "flash" makes the towers compute
cu_seqlens / max_seqlen once per forward and pass them to every layer instead; we register one
that calls torch's varlen flash attention (`torch.nn.attention.varlen.varlen_attn`).

Lifecycle: `enable_varlen_attention(module, device, dtype)` once after the tower is built;
returns False and changes nothing where it cannot run (CPU, float32, a torch without varlen).
"""

from __future__ import annotations

import copy
import logging
import math

import torch

log = logging.getLogger(__name__)

IMPLEMENTATION = "epd_flash_varlen"  # must contain "flash": that is what the towers test for


def _varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                      dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                      cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | None = None,
                      max_length_k: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query/key/value: [1, H, S, D] -> ([1, S, H, D], None), as the flash interface returns."""
    from torch.nn.attention.varlen import varlen_attn

    assert cu_seq_lens_q is not None and max_length_q is not None, "the tower passes cu_seqlens"
    q, k, v = (t.squeeze(0).transpose(0, 1).contiguous() for t in (query, key, value))  # [S, H, D]
    d = q.shape[-1]
    if scaling is not None and not math.isclose(scaling, d ** -0.5):
        q = q * (scaling * math.sqrt(d))  # varlen_attn's default scale is 1/sqrt(D)
    cu_q = cu_seq_lens_q.to(torch.int32)
    cu_k = cu_q if cu_seq_lens_k is None else cu_seq_lens_k.to(torch.int32)
    out = varlen_attn(q, k, v, cu_q, cu_k, int(max_length_q), int(max_length_k or max_length_q))
    return out.unsqueeze(0), None


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def enable_varlen_attention(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Switch a built vision tower (transformers module) to the varlen implementation."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not varlen_available():
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, _varlen_attention)
    # The tower's submodules share the checkpoint's vision config object, which the next tower
    # built from that checkpoint resets to "sdpa": give this tower a config of its own.
    shared = module.config
    own = copy.deepcopy(shared)
    own._attn_implementation = IMPLEMENTATION
    for sub in module.modules():
        if getattr(sub, "config", None) is shared:
            sub.config = own
    log.info("vision tower: varlen flash attention (one call per layer)")
    return True
