"""epd.media.loading: every image source a request can name, and every way it can be bad."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from epd.media import fetching as media_fetch
from epd.media.loading import MediaError, MediaLimits, aload_image, image_content_hash, load_image


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(size: tuple[int, int] = (4, 3), color: object = (255, 0, 0), mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, size, color))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def header_only_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: the decompression-bomb shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b""
    )


def load_error(item: object, **kw: object) -> MediaError:
    with pytest.raises(MediaError) as info:
        load_image(item, **kw)  # type: ignore[arg-type]
    return info.value


# ---------------------------------------------------------------- bytes, data URIs, decoding


def test_png_and_jpeg_bytes_become_rgb_images() -> None:
    img = load_image(png((5, 3), (10, 20, 30)))
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (5, 3), (10, 20, 30))
    jpg = load_image(encode(Image.new("RGB", (8, 8), (0, 200, 0)), "JPEG"))
    assert jpg.mode == "RGB" and abs(jpg.getpixel((4, 4))[1] - 200) < 8


def test_data_uri_decodes_and_tolerates_wrapped_base64() -> None:
    uri = data_uri(png((3, 2)))
    wrapped = uri[:40] + "\n" + uri[40:]
    assert load_image(uri).size == load_image(wrapped).size == (3, 2)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png;base64,@@not-base64@@", "data URI is not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "MIME type 'text/plain' is not an image type"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64", "has no ','"),
    ],
)
def test_bad_data_uri_names_the_problem_and_the_item(uri: str, message: str) -> None:
    err = load_error(uri, index=1, param="messages[0].content[2].image_url.url")
    assert message in str(err) and str(err).startswith("image 2: ")
    assert (err.index, err.param) == (1, "messages[0].content[2].image_url.url")
    assert isinstance(err, ValueError)


def test_transparency_is_composited_on_white() -> None:
    assert load_image(png(color=(0, 0, 0, 0), mode="RGBA")).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(png(color=(0, 255), mode="LA")).getpixel((0, 0)) == (0, 0, 0)
    half = load_image(png(color=(0, 0, 0, 128), mode="RGBA")).getpixel((0, 0))
    assert all(120 <= c <= 135 for c in half)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = encode(Image.new("RGB", (40, 20), "red"), "JPEG", exif=exif.tobytes())
    assert load_image(rotated).size == (20, 40)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(gif).getpixel((1, 1)) == (255, 0, 0)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = load_image(encode(Image.fromarray(arr)))
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (png((64, 64))[:60], "could not decode PNG image bytes (truncated or corrupt?)"),
        (b"hello, this is a text file\n", "not a recognised image format"),
        (b"", "no image data"),
    ],
)
def test_corrupt_truncated_and_non_image_bytes_fail_cleanly(data: bytes, message: str) -> None:
    assert message in str(load_error(data))


def test_unsupported_formats_are_named() -> None:
    pdf = encode(Image.new("RGB", (4, 4)), "PDF")
    assert "image 3: unsupported image format 'PDF'" in str(load_error(pdf, index=2))
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'
    assert "unsupported image format 'SVG'" in str(load_error(svg))
    tiff = encode(Image.new("RGB", (4, 4)), "TIFF")
    assert "unsupported image format 'TIFF'" in str(load_error(tiff))
    opted_in = MediaLimits(allowed_formats=frozenset({"PNG", "TIFF"}))
    assert load_image(tiff, limits=opted_in).size == (4, 4)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, softer check
def test_decompression_bomb_is_refused_from_its_header() -> None:
    start = time.perf_counter()
    err = load_error(header_only_png(10_000, 10_000))
    assert "10000x10000 = 100.0 MP is over the 25 MP per-image limit" in str(err)
    assert "decompression bomb" in str(load_error(header_only_png(100_000, 100_000)))
    assert time.perf_counter() - start < 1.0  # nothing was decoded
    assert "over the 0.0001 MP per-image limit" in str(load_error(png((20, 20)), limits=MediaLimits(max_pixels=100)))


def test_size_and_aspect_ratio_limits() -> None:
    assert load_image(png((1, 1))).size == (1, 1)
    assert load_image(png((400, 2))).size == (400, 2)  # exactly 200:1 is allowed
    assert "aspect ratio 250:1 (1000x4) is over the 200:1 limit" in str(load_error(png((1000, 4))))
    assert "below the minimum side of 8 px" in str(load_error(png((4, 30)), limits=MediaLimits(min_side=8)))
    noise = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    assert "over the 100-byte limit" in str(load_error(encode(noise), limits=MediaLimits(max_bytes=100)))
    with pytest.raises(ValueError, match="allowed_formats"):
        MediaLimits(allowed_formats=frozenset({"PDF"}))


def test_pil_input_is_validated_and_never_modified() -> None:
    rgba = Image.new("RGBA", (6, 2), (0, 0, 255, 0))
    out = load_image(rgba)
    assert (out.mode, rgba.mode, out.getpixel((0, 0))) == ("RGB", "RGBA", (255, 255, 255))
    assert "aspect ratio" in str(load_error(Image.new("RGB", (500, 1))))


def test_content_hash_depends_on_pixels_only() -> None:
    from_png = load_image(png((3, 3), (1, 2, 3)))
    from_pil = load_image(Image.new("RGB", (3, 3), (1, 2, 3)))
    assert image_content_hash(from_png) == image_content_hash(from_pil)
    assert len(image_content_hash(from_png)) == 64
    assert image_content_hash(from_png) != image_content_hash(Image.new("RGB", (3, 3), (1, 2, 4)))
    assert image_content_hash(from_png) != image_content_hash(Image.new("RGB", (1, 9), (1, 2, 3)))


# ---------------------------------------------------------------- local files


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(png((7, 5)))
    (tmp_path / "secret.png").write_bytes(png((9, 9)))
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    return root


def test_any_local_path_is_allowed_for_the_offline_engine(media_dir: Path) -> None:
    path = media_dir / "sub" / "cat.png"
    assert load_image(str(path)).size == load_image(path).size == load_image(path.as_uri()).size == (7, 5)


def test_allowed_dir_serves_files_inside_it(media_dir: Path) -> None:
    kw = dict(allowed_local_dir=str(media_dir), allow_any_local=False)
    assert load_image(str(media_dir / "sub" / "cat.png"), **kw).size == (7, 5)
    assert load_image("sub/cat.png", **kw).size == (7, 5)  # relative to the allowed dir
    assert load_image(f"file://{media_dir}/sub/cat.png", **kw).size == (7, 5)


@pytest.mark.parametrize("item", ["../secret.png", "sub/../../secret.png", "escape.png", "SECRET"])
def test_allowed_dir_refuses_traversal_symlinks_and_outside_paths(media_dir: Path, item: str) -> None:
    item = str(media_dir.parent / "secret.png") if item == "SECRET" else item
    err = load_error(item, allowed_local_dir=str(media_dir), allow_any_local=False)
    assert "is outside the allowed media directory" in str(err)
    assert str(media_dir.parent) not in str(err).replace(item, "")  # no resolved server paths leak


def test_local_files_can_be_switched_off(media_dir: Path) -> None:
    err = load_error(str(media_dir / "sub" / "cat.png"), allow_any_local=False)
    assert "local files are not accepted here" in str(err)


def test_missing_file_directory_and_remote_file_url(media_dir: Path) -> None:
    assert "local file not found" in str(load_error(str(media_dir / "nope.png")))
    assert "is not a regular file" in str(load_error(str(media_dir / "sub")))
    assert "file URL must name no host" in str(load_error("file://evil.example/etc/passwd"))


@pytest.mark.parametrize("item", ["ftp://example.com/a.png", "gopher://x/1", "javascript:alert(1)", "s3://b/k"])
def test_other_schemes_are_refused(item: str) -> None:
    assert "unsupported URL scheme" in str(load_error(item))


# ---------------------------------------------------------------- http(s)

CAT = png((6, 4), (0, 0, 255))


class _Handler(http.server.BaseHTTPRequestHandler):
    routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, CAT),
        "/page": (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),
        "/moved": (302, {"Location": "/cat.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/big": (200, {}, b"\x89PNG\r\n\x1a\n" + b"\0" * 200_000),  # no Content-Length: streamed
    }

    hosts: list[str] = []    # the Host header of every request, in order

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.hosts.append(self.headers.get("Host", ""))
        if self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            time.sleep(1.0)
            return
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        if self.path == "/elsewhere":  # the same server under its address instead of a name
            status, headers = 302, {"Location": f"http://127.0.0.1:{self.server.server_port}/cat.png"}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.path != "/big":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def test_http_url_is_fetched_from_loopback(server: str) -> None:
    img = load_image(f"{server}/cat.png")
    assert (img.size, img.getpixel((0, 0))) == ((6, 4), (0, 0, 255))
    assert load_image(f"{server}/moved").size == (6, 4)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/missing.png", "URL fetch failed: HTTP 404 from http://127.0.0.1:"),
        ("/page", "not a recognised image format (server sent Content-Type 'text/html')"),
        ("/loop", "URL fetch failed: more than 3 redirects"),
        ("/metadata", "link-local / metadata address: http://169.254.169.254/"),
    ],
)
def test_http_failures_say_what_went_wrong(server: str, path: str, message: str) -> None:
    assert message in str(load_error(server + path))


def test_http_limits_on_size_time_and_private_hosts(server: str) -> None:
    small = MediaLimits(max_bytes=50_000)
    assert "is over the 50000-byte limit" in str(load_error(f"{server}/big", limits=small))
    tiny = MediaLimits(max_bytes=20)
    assert "is over the 20-byte limit" in str(load_error(f"{server}/cat.png", limits=tiny))
    start = time.perf_counter()
    err = load_error(f"{server}/slow", limits=MediaLimits(fetch_timeout_s=0.3))
    assert "timed out after 0.3 s" in str(err) and time.perf_counter() - start < 0.9
    closed = MediaLimits(block_private_networks=True)
    assert "private-network address" in str(load_error(f"{server}/cat.png", limits=closed))


def test_http_goes_to_the_checked_address_with_the_name_in_host(server: str, monkeypatch) -> None:
    port = server.rsplit(":", 1)[1]
    assert load_image(f"http://localhost:{port}/cat.png").size == (6, 4)
    assert _Handler.hosts[-1] == f"localhost:{port}"    # the server sees the name, not the address
    # DNS rebinding: the answer the check sees (127.0.0.2, nothing listening there) is not the one a
    # second lookup at connect time would give (localhost -> 127.0.0.1, our server). The request
    # must go where the check looked, so it fails instead of reaching the server.
    real_resolve = media_fetch._resolve

    async def first_answer(host: str, port: int | None) -> list[tuple]:
        return await real_resolve("127.0.0.2", port)

    monkeypatch.setattr(media_fetch, "_resolve", first_answer)
    seen = len(_Handler.hosts)
    err = load_error(f"http://localhost:{port}/cat.png")
    assert "URL fetch failed: ConnectError" in str(err)
    assert len(_Handler.hosts) == seen, "the request reached the address of the second lookup"


def test_metadata_address_is_refused_without_connecting() -> None:
    start = time.perf_counter()
    err = load_error("http://169.254.169.254/latest/meta-data/iam", index=0)
    assert "link-local / metadata address" in str(err) and time.perf_counter() - start < 0.5


def test_async_loader_shares_the_checks(server: str) -> None:
    async def run() -> tuple[Image.Image, Image.Image, MediaError]:
        fetched = await aload_image(f"{server}/cat.png")
        inline = await aload_image(data_uri(png((2, 2))))
        try:
            await aload_image(f"{server}/missing.png", index=3, param="messages[0].content[1].image_url.url")
        except MediaError as exc:
            return fetched, inline, exc
        raise AssertionError("a 404 must fail")

    fetched, inline, err = asyncio.run(run())
    assert fetched.size == (6, 4) and inline.size == (2, 2)
    assert str(err).startswith("image 4: URL fetch failed: HTTP 404")
    assert err.param == "messages[0].content[1].image_url.url"


def test_content_hash_of_a_large_image_sees_every_slice() -> None:
    """720p is several hash slices: equal pixels from PNG and PIL give one key; one changed pixel in
    the last slice, or two slices swapped, give another."""
    pixels = np.random.default_rng(3).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    key = image_content_hash(img)
    assert image_content_hash(load_image(buf.getvalue())) == key == image_content_hash(img, img.tobytes())
    changed = pixels.copy()
    changed[-1, -1, 2] ^= 1
    assert image_content_hash(Image.fromarray(changed)) != key
    rows = 720 * 1280 * 3 // 8 // (1280 * 3)   # rows in an eighth of the image: whole slices apart
    swapped = np.concatenate([pixels[rows:2 * rows], pixels[:rows], pixels[2 * rows:]])
    assert image_content_hash(Image.fromarray(swapped)) != key
