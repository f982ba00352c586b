"""Pillow's bicubic resize of 8-bit images, bit for bit, as torch ops on any device.

The Qwen2-VL processor resizes every image with PIL's bicubic filter before anything else; on the
CPU that is most of an image's preprocessing (a 1280x720 image: ~25 ms of a 2-core host's time,
before the vision tower can start). Pillow's algorithm is integer arithmetic once its filter
taps are known, so it can run where the vision tower runs and give the very same bytes:

1. per axis, the taps of each output pixel: the source range and the bicubic weights, computed in
   float64 as Pillow's `precompute_coeffs` does (same operations, same order, the weight sum taken
   tap by tap), then normalized and turned into 22-bit fixed point as `normalize_coeffs_8bpc` does;
2. a horizontal and a vertical pass (each only where that size changes), each output
   = clip8((1 << 21) + sum(pixel * weight) >> 22), rounding to 8 bits between the passes. Their
   order matters to the bytes: older Pillow always runs the horizontal pass first; newer Pillow
   (13 here) runs the vertical one first when the height shrinks by more than twice as many
   pixels as the width does.

The taps depend only on the two sizes and are cached. Sums stay far inside int32 (as in Pillow),
so the int64 arithmetic here gives identical results on every device. `matches_pillow()` checks,
once per process, that this code reproduces the installed Pillow (and which pass order it uses);
callers fall back to Pillow itself when it does not.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

_PRECISION_BITS = 32 - 8 - 2     # Pillow's fixed point for 8-bit images
_SUPPORT = 2.0                   # the bicubic filter's support


def bicubic_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [H, W, C] -> uint8 [height, width, C], equal to PIL `Image.resize((width, height),
    Image.BICUBIC)` of the same image (given `matches_pillow()`), on the image's device."""
    in_h, in_w = image.shape[:2]
    shrink_h, shrink_w = in_h - height, in_w - width
    vertical_first = _ORDER["by_shrink"] and shrink_h > 0 and shrink_h > 2 * shrink_w
    for dim, size in ((0, height), (1, width)) if vertical_first else ((1, width), (0, height)):
        if size != image.shape[dim]:
            image = _resample(image, dim, size)
    return image


_ORDER = {"by_shrink": True}     # the pass order rule of the installed Pillow (set by matches_pillow)


@functools.cache
def matches_pillow() -> bool:
    """Whether `bicubic_resize` gives the installed Pillow's bytes: probed once on a small random
    image, for resizes where the two pass orders differ, plain up- and downscales, a downscale by
    more than 2 (wider taps) and a large upscale."""
    from PIL import Image

    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    cases = [(30, 44), (40, 20), (61, 53), (21, 17), (9, 13), (48, 7), (200, 150), (47, 41)]   # (height, width)

    def same(height: int, width: int) -> bool:
        ref = np.asarray(Image.fromarray(probe).resize((width, height), resample=Image.BICUBIC))
        return np.array_equal(bicubic_resize(torch.from_numpy(probe), height, width).numpy(), ref)

    for by_shrink in (True, False):
        _ORDER["by_shrink"] = by_shrink
        if all(same(h, w) for h, w in cases):
            return True
    return False


def _resample(image: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    index, weight = (torch.from_numpy(a).to(image.device) for a in _taps(image.shape[dim], out_size))
    shape = [1, 1, 1]
    shape[dim] = out_size
    out_shape = list(image.shape)
    out_shape[dim] = out_size
    acc = torch.full(out_shape, 1 << (_PRECISION_BITS - 1), dtype=torch.int64, device=image.device)
    for tap in range(index.shape[1]):
        acc += image.index_select(dim, index[:, tap]).to(torch.int64) * weight[:, tap].view(shape)
    return (acc >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic_filter (a = -0.5), elementwise, in its order of operations."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output index: source indices [out, ksize] and fixed-point weights [out, ksize]
    (int64; weight 0 past the output's source range, whose indices are clamped into the image)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)    # C's (int) truncates
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    taps = np.arange(ksize)
    live = taps[None, :] < (xmax - xmin)[:, None]
    src = taps[None, :] + xmin[:, None]
    w = np.where(live, _bicubic((src.astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros(out_size)
    for tap in range(ksize):                 # summed tap by tap, as Pillow's loop does
        total = total + w[:, tap]
    k = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = k * (1 << _PRECISION_BITS)
    fixed = np.where(k < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return np.minimum(src, in_size - 1), fixed
