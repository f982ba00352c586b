"""LLaVA-NeXT / OneVision "anyres": an image as a grid of crops plus a base view, and its token count.

The processor picks the pinpoint resolution that keeps most of the image (`select_best_resolution`,
transformers' own choice), fits the image into it, pads and cuts it into crop-size tiles, and adds
the whole image resized to one crop (the base view). Each crop is `side x side` vision tokens. The
tiles' tokens form a (rows * side) x (cols * side) map; the padding's rows or columns are cut
away again ("unpad"), OneVision then shrinks a map larger than `max_area` crops (bilinear), and a
newline embedding ends every row. The prompt holds: base view, then the map row by row.

`token_count` is the one formula the router, the encoder and the checks use; `pack` builds the
embeddings in that order from the projector's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Anyres:
    pinpoints: tuple[tuple[int, int], ...]   # (height, width) resolutions a grid of crops may cover
    crop: int                                # crop side in pixels (the vision tower's image size)
    side: int                                # tokens along a crop's side (crop // patch)
    max_area: int | None = None              # OneVision: crops' worth of tokens before shrinking

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of crops for an image of that size."""
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), [list(p) for p in self.pinpoints])
        return best_h // self.crop, best_w // self.crop

    def map_shape(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the token map after unpadding (and OneVision's shrinking)."""
        rows, cols = self.grid(height, width)
        h, w = rows * self.side, cols * self.side
        if width / height > w / h:
            h -= 2 * ((h - int(round(height * (w / width), 7))) // 2)
        else:
            w -= 2 * ((w - int(round(width * (h / height), 7))) // 2)
        ratio = self._shrink(h, w)
        if ratio is not None:
            h, w = int(h // ratio), int(w // ratio)
        return h, w

    def _shrink(self, h: int, w: int) -> float | None:
        if self.max_area is None:
            return None
        ratio = math.sqrt(h * w / (self.max_area * self.side**2))
        return ratio if ratio > 1.1 else None

    def token_count(self, height: int, width: int, base_tokens: int) -> int:
        h, w = self.map_shape(height, width)
        return base_tokens + h * (w + 1)

    def pack(self, crops: torch.Tensor, height: int, width: int, newline: torch.Tensor) -> torch.Tensor:
        """crops: [1 + rows * cols, base_tokens, D] (base view first) -> [token_count, D]."""
        rows, cols = self.grid(height, width)
        s = self.side
        tiles = crops[1:, -s * s:]   # a CLS token kept by the "full" strategy stays in the base view only
        grid = tiles.reshape(rows, cols, s, s, -1).permute(4, 0, 2, 1, 3).contiguous()
        grid = grid.flatten(1, 2).flatten(2, 3)                  # [D, rows * s, cols * s]
        h, w = grid.shape[1:]
        if width / height > w / h:
            pad = (h - int(round(height * (w / width), 7))) // 2
            grid = grid[:, pad:h - pad, :]
        else:
            pad = (w - int(round(width * (h / height), 7))) // 2
            grid = grid[:, :, pad:w - pad]
        ratio = self._shrink(*grid.shape[1:])
        if ratio is not None:
            size = [int(grid.shape[1] // ratio), int(grid.shape[2] // ratio)]
            grid = F.interpolate(grid[None], size, mode="bilinear")[0]
        line = newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
        grid = torch.cat((grid, line), dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat((crops[0], grid), dim=0)
