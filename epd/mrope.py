"""M-RoPE position ids for the Qwen2-VL family.

Text tokens advance all three rows (temporal, height, width) together. An image's tokens get a
(t, h, w) grid offset by the current position; after the image, text resumes at the current
position + max(h, w) / merge. The *delta* (max position + 1 - sequence length) is what decode
needs: the token at sequence index i has position i + delta in all three rows. Losing the delta
between prefill and decode is the classic disaggregation bug, so it travels with the KV.
"""

from __future__ import annotations

import torch


def mrope_positions(input_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]],
                    merge: int) -> tuple[torch.Tensor, int]:
    """Returns positions [3, len(input_ids)] and the decode delta."""
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
    delta = (int(out.max()) + 1 - n) if n else 0
    return out, delta


def decode_positions(seq_indices: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """seq_indices, deltas: [B] -> positions [3, B]."""
    return (seq_indices + deltas).unsqueeze(0).expand(3, -1)
