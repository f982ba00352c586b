"""M-RoPE for the Qwen2-VL family: three position rows (temporal, height, width).

Text tokens advance all three rows together. An image's tokens get a (t, h, w) grid offset by the
current position; after the image, text resumes at the current position + max(h, w) / merge. The
decode state's `position_offset` (max position + 1 - sequence length) is what decode needs: the
token at sequence index i has position i + offset in all three rows. Losing it between prefill
and decode is the classic disaggregation bug, so it travels with the KV.
"""

from __future__ import annotations

import torch
from torch import nn


def mrope_positions(input_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]],
                    merge: int) -> tuple[torch.Tensor, int]:
    """Returns positions [3, len(input_ids)] and the decode offset."""
    n = len(input_ids)
    out = torch.empty(3, n, dtype=torch.long)
    images = iter(grids)
    i, cur = 0, 0
    while i < n:
        if input_ids[i] != image_token_id:
            j = i
            while j < n and input_ids[j] != image_token_id:
                j += 1
            out[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
            i = j
            continue
        t, h, w = next(images)
        gh, gw = h // merge, w // merge
        count = t * gh * gw
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out[0, i:i + count] = tt.reshape(-1) + cur
        out[1, i:i + count] = hh.reshape(-1) + cur
        out[2, i:i + count] = ww.reshape(-1) + cur
        cur += max(gh, gw)
        i += count
    offset = (int(out.max()) + 1 - n) if n else 0
    return out, offset


class MRotaryEmbedding(nn.Module):
    """Frequency bands take their position from the temporal, height or width row."""

    def __init__(self, head_dim: int, theta: float, section: tuple[int, ...]) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        band = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("band", band, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [3, T] -> cos, sin: [T, head_dim]."""
        pos = positions.float()[self.band]              # [D/2, T]
        freqs = (pos * self.inv_freq[:, None]).t()      # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
