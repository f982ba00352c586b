"""Loading and validating images from untrusted request items.

Lifecycle of one item in ``load_image`` / ``aload_image``:
1. source: PIL image | bytes | ``data:image/...;base64,`` URI | ``http(s)://`` URL | ``file://``
   URL | local path; other schemes (``ftp:``, ``gopher:``, ``javascript:``) are refused.
2. bytes: decode the data URI, read the file under the local-file policy, or stream the URL with a
   byte cap and a deadline, following at most ``max_redirects`` redirects, each hop re-checked.
3. decode: sniff magic bytes and refuse formats not allowed; check the header's size before any
   pixel is decoded (bomb guard: ``max_pixels`` per image, and the request's ``PixelBudget``, which
   each image reserves its header's pixels from, for ``max_request_pixels``); ``verify()`` then
   ``load()`` so truncated data fails here. ``aload_image`` decodes on the ``decoder`` pool given:
   its size bounds the images decoding at once across requests, so the pixels held by decoding stay
   under ``decode_threads * max_pixels * 3`` bytes (RGB).
4. normalise: EXIF orientation applied, first frame only, RGB with alpha composited on white.
The router stops after step 3's header checks (``epd.media.encoded``): the node that runs the vision
tower decodes the bytes, held to the size the router read.

Formats: PNG, JPEG, WEBP, GIF, BMP (OpenAI's list plus BMP); TIFF is opt-in (big parser, multi-page,
rare on the web); PDF, SVG, HEIF/AVIF, ICO, PSD are named in errors, never decoded. ``min_side``
is 1 px because Qwen2-VL's processor scales small images up itself.

Local files: ``allowed_local_dir=None, allow_any_local=True`` (offline Engine) reads any path.
The HTTP router passes ``allow_any_local=False`` and, to serve files at all, ``allowed_local_dir``;
paths (relative ones taken from it) must stay inside it once ``..`` and symlinks are resolved.
Network (``epd.media.fetching``): ``allowed_domains`` (None: any host) names the hosts URLs may
point at; ``block_link_local`` (default on) refuses hosts resolving to link-local / cloud-metadata
addresses (169.254.169.254, also as NAT64 / 6to4 / IPv4-mapped IPv6); loopback stays allowed.
``block_private_networks`` refuses every non-global address. An environment proxy is trusted.

Failures raise ``MediaError`` (a ``ValueError``): the message starts "image N:" (1-based);
``index`` (0-based) and ``param`` let the HTTP layer answer with an OpenAI-style 400.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import io
import os
import re
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np
import pybase64
from PIL import Image, ImageOps

from epd.media.fetching import fetch, fetch_blocking, short

ImageItem = Image.Image | bytes | bytearray | memoryview | str | os.PathLike

DEFAULT_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
_DECODABLE = DEFAULT_FORMATS | {"TIFF"}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")  # 2+ chars so "C:\x.png" stays a path
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\xff\x0a", "JPEG XL"),
)


class MediaError(ValueError):
    """An image item could not be used. ``index`` is 0-based; the message counts from 1."""

    def __init__(self, message: str, *, index: int | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.param = param


@dataclass(frozen=True)
class MediaLimits:
    """What a request's images may be; built once at start-up and shared by every request."""

    max_pixels: int = 25_000_000  # per image, from its header: 4K and 24 MP photos pass, a 49 MP bomb does not
    max_request_pixels: int = 100_000_000  # a request's images together; ~128k Qwen2-VL tokens of 28x28 px
    max_images: int = 32  # per request, counted before anything is fetched (vLLM's --limit-mm-per-prompt)
    decode_threads: int = 4  # images decoding (router: header reads) at once, over all requests
    min_side: int = 1
    max_aspect_ratio: float = 200.0  # Qwen2-VL's processor refuses anything longer
    max_bytes: int = 20 * 1024 * 1024  # encoded size, for every kind of source
    allowed_formats: frozenset[str] = DEFAULT_FORMATS
    fetch_timeout_s: float = 10.0  # whole URL fetch, redirects included
    max_redirects: int = 3
    block_link_local: bool = True
    block_private_networks: bool = False
    allowed_domains: frozenset[str] | None = None  # URL hosts that may be fetched, exactly; None: any

    def __post_init__(self) -> None:
        sizes = (self.max_pixels, self.max_request_pixels, self.decode_threads, self.min_side, self.max_bytes)
        if min(*sizes, self.max_aspect_ratio) < 1 or (
            self.max_images < 0 or self.max_redirects < 0 or self.fetch_timeout_s <= 0
        ):
            raise ValueError("MediaLimits: sizes and max_aspect_ratio must be >= 1, counts >= 0, timeouts > 0")
        if self.allowed_domains is not None:  # compared with a URL's host, lower case and without a final dot
            names = frozenset(name.strip().rstrip(".").lower() for name in self.allowed_domains)
            object.__setattr__(self, "allowed_domains", names)
        if not self.allowed_formats <= _DECODABLE:
            raise ValueError(f"MediaLimits: allowed_formats must be a subset of {sorted(_DECODABLE)}")


DEFAULT_LIMITS = MediaLimits()


@dataclass(frozen=True)
class _Where:
    index: int  # which item is being loaded, for error messages
    param: str | None

    def error(self, detail: str) -> MediaError:
        return MediaError(f"image {self.index + 1}: {detail}", index=self.index, param=self.param)


class PixelBudget:
    """One request's pixels (``max_request_pixels``): each of its images reserves its header's size
    before a pixel of it is decoded, so the request's images never decode past the cap; the image
    that would cross it fails the request. Thread-safe: reservations come from decoder threads."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, size: tuple[int, int], where: _Where) -> None:
        width, height = size
        with self._lock:
            total = self.used + width * height
            if total > self.cap:
                mp, cap = total / 1e6, self.cap / 1e6
                raise where.error(f"size {width}x{height} brings the request's images to {mp:.3g} MP, over "
                                  f"the {cap:g} MP per-request limit")
            self.used = total


def load_image(
    item: ImageItem, *, allowed_local_dir: str | None = None, allow_any_local: bool = True,
    limits: MediaLimits = DEFAULT_LIMITS, index: int = 0, param: str | None = None,
) -> Image.Image:
    """Load, validate and normalise one image item to an RGB ``PIL.Image``; raises ``MediaError``."""
    where = _Where(index, param)
    if isinstance(item, Image.Image):
        return _from_pil(item, limits, where)
    source = _read_source(item, allowed_local_dir, allow_any_local, limits, where)
    if isinstance(source, bytes):
        return _decode(source, limits, where)
    data, content_type = fetch_blocking(source, limits, where)
    return _decode(data, limits, where, content_type)


async def aload_image(
    item: ImageItem, *, allowed_local_dir: str | None = None, allow_any_local: bool = True,
    limits: MediaLimits = DEFAULT_LIMITS, index: int = 0, param: str | None = None,
    client: httpx.AsyncClient | None = None, budget: PixelBudget | None = None, decoder: Executor | None = None,
) -> Image.Image:
    """``load_image`` for the router: URLs are fetched through ``client`` (a temporary one if None);
    file reads run in a worker thread and decoding on ``decoder`` (asyncio's default threads if None),
    so the event loop never waits on them. ``budget``: the request's, shared by all its images."""
    where = _Where(index, param)
    loop = asyncio.get_running_loop()
    if isinstance(item, Image.Image):
        return await loop.run_in_executor(decoder, _from_pil, item, limits, where, budget)
    source = await asyncio.to_thread(_read_source, item, allowed_local_dir, allow_any_local, limits, where)
    data, content_type = (source, None) if isinstance(source, bytes) else await fetch(source, limits, where, client)
    return await loop.run_in_executor(decoder, _decode, data, limits, where, content_type, budget)


_HASH_SLICE = 1 << 19
_hash_pool: ThreadPoolExecutor | None = None


def image_content_hash(img: Image.Image, raw: bytes | None = None) -> str:
    """Hex sha256 over mode, size and the sha256 of each 512 KiB slice of the raw pixels: equal
    for equal pixels whatever the source. The slices are hashed on a few threads (hashlib lets go
    of the GIL), as this sits on the request's path in the router: a 720p image 1.8 -> 1.2 ms on
    two cores. `raw`: `img.tobytes()` when the caller already has it (a 720p copy is ~1.5 ms)."""
    return content_hash(f"{img.mode}:{img.width}x{img.height}:", img.tobytes() if raw is None else raw)


def content_hash(header: str, data: Any) -> str:
    """Hex sha256 over `header` and the sha256 of each 512 KiB slice of `data` (any contiguous
    buffer), the slices hashed on a few threads."""
    global _hash_pool
    view = memoryview(data).cast("B")
    starts = range(0, len(view), _HASH_SLICE)
    if len(starts) > 1:
        _hash_pool = _hash_pool or ThreadPoolExecutor(4, thread_name_prefix="epd-hash")
        slices = list(_hash_pool.map(lambda i: hashlib.sha256(view[i:i + _HASH_SLICE]).digest(), starts))
    else:
        slices = [hashlib.sha256(view).digest()]
    return hashlib.sha256(header.encode() + b"".join(slices)).hexdigest()


def _read_source(item: object, allowed_dir: str | None, allow_any: bool, limits: MediaLimits,
                 where: _Where) -> bytes | str:
    """The item's encoded bytes, or its http(s) URL (a str) when it must be fetched."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, os.PathLike):
        return _read_local(Path(item), allowed_dir, allow_any, limits, where)
    if not isinstance(item, str):
        raise where.error(f"unsupported image item of type {type(item).__name__}")
    text = item.strip()
    match = _SCHEME_RE.match(text)
    scheme = match.group(1).lower() if match else ""
    if not text:
        raise where.error("image reference is empty")
    if scheme in ("http", "https"):
        return text
    if scheme == "data":
        return _decode_data_uri(text, limits, where)
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise where.error(f"file URL must name no host or localhost: {short(text)!r}")
        text = unquote(parts.path)
    elif scheme:
        hint = "use http(s)://, data:image/...;base64, or a file path"
        raise where.error(f"unsupported URL scheme '{scheme}:' in {short(text, 60)!r}; {hint}")
    return _read_local(Path(text), allowed_dir, allow_any, limits, where)


def _decode_data_uri(uri: str, limits: MediaLimits, where: _Where) -> bytes:
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma:
        raise where.error("data URI has no ',' between its header and its data")
    mime, *params = (p.strip().lower() for p in header.split(";"))
    if not mime.startswith("image/"):
        raise where.error(f"data URI MIME type '{mime or '(none)'}' is not an image type")
    if "base64" not in params:
        raise where.error("data URI must be base64-encoded ('data:image/png;base64,...')")
    if len(payload) // 4 * 3 > limits.max_bytes:
        raise where.error(f"data URI holds more than the {limits.max_bytes}-byte limit")
    try:   # pybase64: a 3.7 MB image in 0.2 ms, the standard library's 13.5 ms (bench/edge_codecs.py)
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # some clients wrap base64 lines (stripping first would copy every payload)
        return pybase64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise where.error("data URI is not valid base64") from exc


def _read_local(path: Path, allowed_dir: str | None, allow_any: bool, limits: MediaLimits,
                where: _Where) -> bytes:
    shown = short(str(path))
    if allowed_dir is not None:
        root = os.path.realpath(allowed_dir)
        real = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root here
        if os.path.commonpath([root, real]) != root:
            raise where.error(f"local file {shown!r} is outside the allowed media directory")
    elif allow_any:
        real = os.path.realpath(path)
    else:
        raise where.error("local files are not accepted here; send an http(s) URL or a data URI")
    try:
        # O_NONBLOCK: a FIFO cannot hang us; O_NOFOLLOW: no symlink swapped in after realpath.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise where.error(f"local file not found: {shown!r}") from exc
    except OSError as exc:
        raise where.error(f"could not open local file {shown!r}: {exc.strerror}") from exc
    info = os.fstat(fd)
    too_big = info.st_size > limits.max_bytes
    if too_big or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        problem = f"is over the {limits.max_bytes}-byte limit" if too_big else "is not a regular file"
        raise where.error(f"local path {shown!r} {problem}")
    with os.fdopen(fd, "rb") as f:
        return f.read(limits.max_bytes + 1)


def _sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        return "AVIF" if data[8:12] in (b"avif", b"avis") else "HEIF"
    fmt = next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)
    return fmt or ("SVG" if b"<svg" in data[:1024].lower() else None)


def _check_geometry(size: tuple[int, int], limits: MediaLimits, where: _Where) -> None:
    width, height = size
    if width < limits.min_side or height < limits.min_side:
        raise where.error(f"size {width}x{height} is below the minimum side of {limits.min_side} px")
    if width * height > limits.max_pixels:
        mp, cap = width * height / 1e6, limits.max_pixels / 1e6
        raise where.error(f"size {width}x{height} = {mp:.1f} MP is over the {cap:g} MP per-image limit (bomb?)")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        cap = f"{limits.max_aspect_ratio:g}:1"
        raise where.error(f"aspect ratio {ratio:.0f}:1 ({width}x{height}) is over the {cap} limit")


def _decode(data: bytes, limits: MediaLimits, where: _Where, content_type: str | None = None,
            budget: PixelBudget | None = None) -> Image.Image:
    fmt = _format_of(data, limits, where, content_type)
    with pillow_errors(fmt, where, "decode"):
        with Image.open(io.BytesIO(data), formats=[fmt]) as probe:
            _check_geometry(probe.size, limits, where)  # header only: nothing decoded yet
            if budget is not None:
                budget.reserve(probe.size, where)
            probe.verify()
        img = Image.open(io.BytesIO(data), formats=[fmt])
        img.load()
    return _to_rgb(img, where, owned=True)


def _format_of(data: bytes, limits: MediaLimits, where: _Where, content_type: str | None = None) -> str:
    """The format of encoded bytes, from their magic, once it is one `limits` allow."""
    if not data:
        raise where.error("no image data (0 bytes)")
    if len(data) > limits.max_bytes:
        raise where.error(f"{len(data)} bytes is over the {limits.max_bytes}-byte limit")
    fmt = _sniff_format(data)
    if fmt is None:
        sent = f" (server sent Content-Type {content_type!r})" if content_type else ""
        raise where.error(f"could not decode image bytes: not a recognised image format{sent}")
    if fmt not in limits.allowed_formats:
        allowed = ", ".join(sorted(limits.allowed_formats))
        raise where.error(f"unsupported image format '{fmt}' (allowed: {allowed})")
    return fmt


@contextlib.contextmanager
def pillow_errors(fmt: str, where: _Where, doing: str) -> Iterator[None]:
    """Pillow's many exception types on hostile input as one MediaError (ours pass through)."""
    try:
        yield
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise where.error(f"over Pillow's pixel limit (decompression bomb?): {exc}") from exc
    except Exception as exc:
        raise where.error(f"could not {doing} {fmt} image bytes (truncated or corrupt?)") from exc


def _from_pil(img: Image.Image, limits: MediaLimits, where: _Where, budget: PixelBudget | None = None) -> Image.Image:
    _check_geometry(img.size, limits, where)
    if budget is not None:
        budget.reserve(img.size, where)
    try:
        img.load()
    except Exception as exc:
        raise where.error("could not decode image (truncated or corrupt?)") from exc
    return _to_rgb(img, where, owned=False)


_ORIENTATION = 0x0112   # the EXIF tag


def _to_rgb(img: Image.Image, where: _Where, owned: bool) -> Image.Image:
    """RGB, EXIF orientation applied. An image we decoded ourselves (`owned`) is turned in place;
    a caller's image never changes (exif_transpose then returns a new one: ~5 ms for 720p)."""
    if owned:
        ImageOps.exif_transpose(img, in_place=True)
    elif img.getexif().get(_ORIENTATION, 1) != 1:   # (without a turn to apply it would copy all the same)
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_depth_to_rgb(img)  # scale 16-bit / float grey to 8 bits instead of clipping
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise where.error(f"unsupported colour mode '{img.mode}'") from exc


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)  # [height, width]
    peak = float(arr.max(initial=0.0))
    if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        arr = arr / 257.0
    elif img.mode == "F" and peak <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
