"""Synthetic images for the ``random-image`` workload.

Lifecycle: ``plan_image_slots`` decides, before any pixel is made, which image each slot of
the workload shows (a share of slots repeat an earlier image so encoder caches get hits);
``ImageBank`` then renders each distinct image once, on first use, and hands out the same
base64 data URI for every slot that shows it, so repeats cost no extra memory.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

MIME = {"png": "image/png", "jpeg": "image/jpeg"}


def plan_image_slots(num_slots: int, repeat_ratio: float, rng: np.random.Generator) -> list[int]:
    """Which distinct image each of ``num_slots`` slots shows.

    Exactly ``round(num_slots * repeat_ratio)`` slots repeat an image that appeared in an
    earlier slot (at least one image stays distinct). Ids are numbered in order of first
    appearance, so image ``i`` is first needed before image ``i + 1``.
    """
    if num_slots <= 0:
        return []
    num_repeats = min(round(num_slots * repeat_ratio), num_slots - 1)
    num_unique = num_slots - num_repeats
    slots = np.concatenate([np.arange(num_unique), rng.integers(0, num_unique, size=num_repeats)])
    rng.shuffle(slots)
    relabel: dict[int, int] = {}
    for raw in slots.tolist():
        relabel.setdefault(raw, len(relabel))
    return [relabel[raw] for raw in slots.tolist()]


def render_image(image_id: int, size: tuple[int, int], content: str, fmt: str, rng: np.random.Generator) -> bytes:
    """Encoded bytes of one ``size = (width, height)`` image.

    ``random`` is uniform noise (worst case for compression and for any pixel cache);
    ``blank`` is one flat colour chosen from ``image_id`` so distinct ids stay distinct.
    """
    width, height = size
    if content == "random":
        # pixels: [height, width, 3] uint8
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)  # [h, w, 3] uint8 is read as RGB
    elif content == "blank":
        colour = tuple(255 - ((image_id >> shift) & 0xFF) for shift in (16, 8, 0))
        image = Image.new("RGB", (width, height), colour)
    else:
        raise ValueError(f"unknown image content {content!r}: use random or blank")
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)  # noise does not compress; favour speed
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=90)
    else:
        raise ValueError(f"unknown image format {fmt!r}: use png or jpeg")
    return buf.getvalue()


def data_uri(payload: bytes, fmt: str) -> str:
    return f"data:{MIME[fmt]};base64,{base64.b64encode(payload).decode('ascii')}"


class ImageBank:
    """Renders each distinct image once and returns its data URI for every slot."""

    def __init__(self, size: tuple[int, int], content: str, fmt: str, seed: int) -> None:
        self.size = size
        self.content = content
        self.fmt = fmt
        self._rng = np.random.default_rng(seed)
        self._uris: dict[int, str] = {}

    def uri(self, image_id: int) -> str:
        if image_id not in self._uris:
            payload = render_image(image_id, self.size, self.content, self.fmt, self._rng)
            self._uris[image_id] = data_uri(payload, self.fmt)
        return self._uris[image_id]

    @property
    def num_rendered(self) -> int:
        return len(self._uris)
