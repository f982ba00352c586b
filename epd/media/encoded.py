"""Images checked from their header only: the router's view of an image a node will decode.

Lifecycle of one item:
1. router: ``aprobe_image`` / ``probe_image`` get the item's bytes exactly as ``aload_image`` /
   ``load_image`` do (data URI, URL fetched with the same hostile-URL guards, allowed local files),
   then read only the header: format sniffed and allowed, size checked against ``MediaLimits`` and
   reserved from the request's ``PixelBudget``, EXIF orientation read (5-8 swap width and height),
   PNG chunk CRCs verified. No pixel is decoded: an ``EncodedImage`` (bytes + oriented size).
2. router: the layout comes from ``size``, the content hash from the bytes (``content_hash``); the
   bytes cross to the node (``protocol.ImagePayload.data``) instead of ~6x as many RGB bytes.
3. node: ``EncodedImage.declared`` takes the bytes and the size the router declared; ``decode``
   holds the header to that many pixels before decoding (the bomb guard: the router checked the
   size against its own limits, raised or not), decodes as ``load_image`` does (EXIF orientation,
   first frame, RGB with alpha on white) and fails with ``MediaError`` unless the decoded size is
   the declared one. ``decode_many`` / ``decode_each`` decode several on a few threads (Pillow lets
   go of the GIL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from PIL import Image

from epd.media.fetching import fetch, fetch_blocking
from epd.media.loading import (
    _DECODABLE,
    _ORIENTATION,
    DEFAULT_LIMITS,
    ImageItem,
    MediaError,
    MediaLimits,
    PixelBudget,
    _check_geometry,
    _decode,
    _format_of,
    _read_source,
    _Where,
    content_hash,
    pillow_errors,
)

_SWAPPED = (5, 6, 7, 8)        # transpose, rotate 270, transverse, rotate 90: width and height trade places


@dataclass(frozen=True)
class EncodedImage:
    """An image's encoded bytes and its size once EXIF orientation is applied (what its layout is
    computed from); `format` as sniffed from the bytes' magic."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @classmethod
    def declared(cls, data: bytes, width: int, height: int) -> EncodedImage:
        """A node's view of bytes the router sent, with the oriented size it declared for them."""
        return cls(data, "", width, height)

    def content_hash(self) -> str:
        """Hex sha256 over the size and the encoded bytes: the image's identity for the encoder's
        embedding cache, image-affinity routing and prefix caching (equal bytes, equal key)."""
        return content_hash(f"encoded:{self.width}x{self.height}:", self.data)

    def decode(self, index: int = 0, param: str | None = None) -> Image.Image:
        """The RGB image, decoded as `load_image` does; `MediaError` ("image {index + 1}: ...") when
        the bytes are corrupt, their header claims more pixels than declared (before any pixel is
        decoded), or the decoded image is not of the declared size."""
        where = _Where(index, param)
        if min(self.size) < 1:
            raise where.error(f"declared size {self.width}x{self.height} is empty")
        img = _decode(self.data, _held_to(self), where)
        if img.size != self.size:
            raise where.error(f"decoded size {img.width}x{img.height} is not the {self.width}x{self.height} "
                              f"the router declared for it")
        return img


def _held_to(image: EncodedImage) -> MediaLimits:
    """Limits that pass exactly the declared size (its pixel count, either way round): the router
    already held it to its own limits, which a node must not undo or tighten."""
    width, height = image.size
    return dataclasses.replace(DEFAULT_LIMITS, max_pixels=width * height, max_bytes=max(1, len(image.data)),
                               max_aspect_ratio=max(width, height) / min(width, height), min_side=1,
                               allowed_formats=_DECODABLE)


_decode_pool: ThreadPoolExecutor | None = None


def decode_many(images: list[EncodedImage], indexes: list[int] | None = None) -> list[Image.Image]:
    """Each image decoded (`EncodedImage.decode`; `indexes`: their places in the request, for
    errors), several on a few threads; the first failure raises its `MediaError`."""
    out = decode_each(images, indexes)
    failed = next((r for r in out if isinstance(r, MediaError)), None)
    if failed is not None:
        raise failed
    return out  # type: ignore[return-value]


def decode_each(images: list[EncodedImage], indexes: list[int] | None = None) -> list[Image.Image | MediaError]:
    """Each image decoded, or the `MediaError` saying why not; several on a few threads."""
    global _decode_pool
    indexed = list(zip(indexes if indexes is not None else range(len(images)), images, strict=True))

    def one(pair: tuple[int, EncodedImage]) -> Image.Image | MediaError:
        try:
            return pair[1].decode(pair[0])
        except MediaError as e:
            return e
    if len(indexed) < 2:
        return [one(pair) for pair in indexed]
    _decode_pool = _decode_pool or ThreadPoolExecutor(4, thread_name_prefix="epd-image-decode")
    return list(_decode_pool.map(one, indexed))


def probe_image(
    item: ImageItem, *, allowed_local_dir: str | None = None, allow_any_local: bool = True,
    limits: MediaLimits = DEFAULT_LIMITS, index: int = 0, param: str | None = None,
) -> EncodedImage:
    """`load_image` up to the header: the item's bytes, checked, its oriented size; nothing decoded."""
    where = _Where(index, param)
    source = _read_source(item, allowed_local_dir, allow_any_local, limits, where)
    data, content_type = (source, None) if isinstance(source, bytes) else fetch_blocking(source, limits, where)
    return probe_bytes(data, limits, where, content_type)


async def aprobe_image(
    item: ImageItem, *, allowed_local_dir: str | None = None, allow_any_local: bool = True,
    limits: MediaLimits = DEFAULT_LIMITS, index: int = 0, param: str | None = None,
    client: httpx.AsyncClient | None = None, budget: PixelBudget | None = None, decoder: Executor | None = None,
) -> EncodedImage:
    """`aload_image` up to the header, for the router: URLs fetched through `client`, file reads on
    a worker thread, the header read on `decoder`; `budget` is the request's, shared by its images."""
    where = _Where(index, param)
    source = await asyncio.to_thread(_read_source, item, allowed_local_dir, allow_any_local, limits, where)
    data, content_type = (source, None) if isinstance(source, bytes) else await fetch(source, limits, where, client)
    return await asyncio.get_running_loop().run_in_executor(decoder, probe_bytes, data, limits, where,
                                                            content_type, budget)


def probe_bytes(data: bytes, limits: MediaLimits, where: _Where, content_type: str | None = None,
                budget: PixelBudget | None = None) -> EncodedImage:
    """Encoded bytes checked from their header (`limits`, `budget`) as an `EncodedImage`."""
    fmt = _format_of(data, limits, where, content_type)
    with pillow_errors(fmt, where, "read the header of"):
        with Image.open(io.BytesIO(data), formats=[fmt]) as probe:
            _check_geometry(probe.size, limits, where)
            if budget is not None:
                budget.reserve(probe.size, where)
            width, height = probe.size
            if _orientation(probe, data) in _SWAPPED:
                width, height = height, width
            probe.verify()
    return EncodedImage(data, fmt, width, height)


def _orientation(probe: Image.Image, data: bytes) -> int:
    """The EXIF orientation `ImageOps.exif_transpose` will apply once the image is decoded."""
    if probe.format == "PNG" and "exif" not in probe.info:
        raw = _png_exif(data)   # Pillow's own getexif() would decode the image to find one after IDAT
        if raw is None:
            return 1
        exif = Image.Exif()
        exif.load(b"Exif\x00\x00" + raw)
        return exif.get(_ORIENTATION, 1)
    return probe.getexif().get(_ORIENTATION, 1)


def _png_exif(data: bytes) -> bytes | None:
    """A PNG's eXIf chunk, found by walking the chunk headers (nothing is decompressed)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"eXIf":
            return data[pos + 8:pos + 8 + length]
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None
