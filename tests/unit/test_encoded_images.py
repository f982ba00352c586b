"""Images the router reads only up to the header, sent on as their encoded bytes, decoded by the node
that runs the vision tower: sizes from headers (EXIF orientation included), a node holding the bytes
to the declared size (mismatch and bomb refused before or after decoding, failing that request
only), and the same pixels, layouts and content keys as decoding in the router gave."""

from __future__ import annotations

import asyncio
import struct
import zlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from support import noise_image
from test_media import data_uri, encode, header_only_png

from epd import protocol
from epd.config import ModelConfig, load_tokenizer
from epd.engine.inputs import ImageInput, InputProcessor
from epd.media.encoded import EncodedImage, aprobe_image, decode_many, probe_image
from epd.media.loading import MediaError, MediaLimits, load_image
from epd.models.family import ImageLayout

PROMPT = "<|vision_start|><|image_pad|><|vision_end|>describe"


def rotated_jpeg(orientation: int, size: tuple[int, int] = (40, 20)) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(noise_image(*size), "JPEG", quality=90, exif=exif.tobytes())


def png_with_late_exif(orientation: int) -> bytes:
    """A PNG whose eXIf chunk comes after its pixel data (Pillow finds it only once decoded)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = encode(noise_image(30, 10), "PNG")
    body = exif.tobytes()[6:]   # without the "Exif\0\0" prefix, as PNG stores it
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    return raw[:-12] + chunk + raw[-12:]   # before IEND


@pytest.mark.parametrize(("orientation", "size"), [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40)),
                                                   (5, (20, 40))])
def test_size_comes_from_the_header_with_exif_orientation(orientation: int, size: tuple[int, int]) -> None:
    data = rotated_jpeg(orientation)
    probed = probe_image(data)
    assert (probed.format, probed.size) == ("JPEG", size)
    assert load_image(data).size == size, "the router's size is the one decoding gives"
    assert probed.decode().tobytes() == load_image(data).tobytes()


def test_a_png_exif_after_the_pixels_is_found_without_decoding() -> None:
    data = png_with_late_exif(6)
    assert probe_image(data).size == (10, 30) == load_image(data).size


def test_data_uris_and_urls_are_read_as_the_loader_reads_them() -> None:
    data = rotated_jpeg(6)
    assert probe_image(data_uri(data, "image/jpeg")).data == data
    with pytest.raises(MediaError, match="image 2: .*per-image limit"):
        asyncio.run(aprobe_image(data, limits=MediaLimits(max_pixels=100), index=1))
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp:'"):
        probe_image("ftp://example.com/cat.png")


def test_a_pixel_bomb_is_refused_by_the_router_from_its_header() -> None:
    with pytest.raises(MediaError, match="7000x7000 = 49.0 MP is over the 25 MP per-image limit"):
        probe_image(header_only_png(7000, 7000))


def test_the_content_hash_is_a_function_of_the_bytes_and_size() -> None:
    data = rotated_jpeg(1)
    one, again = probe_image(data), probe_image(data_uri(data, "image/jpeg"))
    assert one.content_hash() == again.content_hash() == EncodedImage.declared(data, 40, 20).content_hash()
    assert len(one.content_hash()) == 64
    assert one.content_hash() != probe_image(rotated_jpeg(1, (40, 21))).content_hash()
    assert one.content_hash() != EncodedImage.declared(data, 20, 40).content_hash()


# ---------------------------------------------------------------- at the node

def test_the_node_fails_an_image_whose_size_is_not_the_declared_one() -> None:
    data = rotated_jpeg(6)              # 20x40 once oriented
    assert EncodedImage.declared(data, 20, 40).decode().size == (20, 40)
    with pytest.raises(MediaError, match="image 3: decoded size 20x40 is not the 40x20 the router declared"):
        EncodedImage.declared(data, 40, 20).decode(index=2)
    with pytest.raises(MediaError, match="over the .* per-image limit"):   # more pixels than declared
        EncodedImage.declared(data, 20, 39).decode()
    with pytest.raises(MediaError, match="could not decode JPEG image bytes"):
        EncodedImage.declared(data[:300], 20, 40).decode()


def test_the_node_refuses_a_bomb_from_its_header_before_decoding() -> None:
    """The header claims 49 MP where the router declared 100 x 100: refused before a pixel is decoded."""
    with pytest.raises(MediaError, match="7000x7000 = 49.0 MP is over the 0.01 MP per-image limit"):
        EncodedImage.declared(header_only_png(7000, 7000), 100, 100).decode()


def test_the_node_keeps_the_routers_raised_limits() -> None:
    """A size the router allowed (its --max-image-pixels raised) decodes at the node: not undone there."""
    data = encode(noise_image(300, 200), "PNG")
    assert probe_image(data, limits=MediaLimits(max_pixels=60_000)).size == (300, 200)
    assert EncodedImage.declared(data, 300, 200).decode().size == (300, 200)


def test_decode_many_names_the_failing_image() -> None:
    good = EncodedImage.declared(rotated_jpeg(1), 40, 20)
    assert [im.size for im in decode_many([good, good])] == [(40, 20)] * 2
    with pytest.raises(MediaError, match="image 5: decoded size"):
        decode_many([good, EncodedImage.declared(good.data, 20, 40)], [0, 4])


def test_payloads_carry_encoded_bytes_or_rgb_never_both() -> None:
    data = rotated_jpeg(1)
    msg = protocol.EncodeRequest("r1", [protocol.ImagePayload(40, 20, b"", "h", [4, 1, 2, 2], data)], "p", "x:1")
    assert protocol.decode(protocol.encode(msg)).images[0].data == data
    both = protocol.ImagePayload(40, 20, b"\0" * 2400, "h", [4, 1, 2, 2], data)
    with pytest.raises(protocol.ProtocolError, match="both RGB and encoded bytes"):
        protocol.decode(protocol.encode(protocol.EncodeRequest("r1", [both], "p", "x:1")))
    rgb = protocol.ImagePayload(2, 2, b"\0" * 12, "h", [1, 1, 2, 2])
    assert protocol.decode(protocol.encode(protocol.EncodeRequest("r1", [rgb], "p", "x:1"))).images[0].rgb


# ---------------------------------------------------------------- the input stage, both sides

@pytest.fixture(scope="module")
def qwen(tiny_models) -> tuple[ModelConfig, object]:
    path = tiny_models["qwen2_vl"]
    return ModelConfig.from_pretrained(path), load_tokenizer(path)


def test_router_and_node_make_what_decoding_in_the_router_made(qwen) -> None:
    """Header-only at the router, decoded at the node: the same prompt, layout and preprocessed pixels
    as the router decoding the image itself (so greedy outputs stay token for token)."""
    config, tokenizer = qwen
    data = rotated_jpeg(6, (96, 60))
    router = InputProcessor(config, tokenizer, 4096, with_pixels=False)
    ours = router.process(prompt=PROMPT, image_data=[data])
    decoded = router.process(prompt=PROMPT, image_data=[load_image(data)])
    assert isinstance(ours.images[0].source, EncodedImage) and ours.images[0].source_data == data
    assert ours.input_ids == decoded.input_ids and ours.images[0].layout == decoded.images[0].layout
    assert ours.images[0].content_hash and ours.images[0].source_rgb is None
    node = InputProcessor(config, tokenizer, 4096, with_pixels=True)
    sent = [ImageInput(ours.images[0].layout, source=EncodedImage.declared(data, 60, 96))]
    node.preprocess(sent)
    assert sent[0].pixels.content_key() == node.process(prompt=PROMPT, image_data=[data]).images[0].content_hash


def test_a_node_fails_a_mismatched_image_as_a_bad_request(qwen) -> None:
    config, tokenizer = qwen
    data = rotated_jpeg(1, (96, 60))
    node = InputProcessor(config, tokenizer, 4096, with_pixels=True)
    layout = node.image_processor.layout(Image.new("RGB", (60, 96)))
    with pytest.raises(MediaError, match="image 1: decoded size 96x60 is not the 60x96"):
        node.preprocess([ImageInput(layout, source=EncodedImage.declared(data, 60, 96))])


class FakeRuntime:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []
        self.node_id = "enc-test"
        self.transport = SimpleNamespace(connect=lambda address: None, sends_in_flight=0,
                                         send=lambda *args, **kw: None)

    def send(self, identity: bytes, msg: object) -> None:
        self.sent.append((identity, msg))


def test_the_encoder_fails_only_the_request_with_a_bad_image(tiny_models, qwen) -> None:
    from encoder_node.service import EncoderService

    config, _ = qwen
    service = EncoderService(config, "cpu", torch.float32)
    service.runtime = FakeRuntime()
    good, bad = rotated_jpeg(6, (96, 60)), rotated_jpeg(1, (96, 60))
    layout = service.processor.layout(Image.new("RGB", (60, 96))).to_wire()
    for rid, data in (("ok", good), ("bad", bad)):   # `bad` declares 60x96 but is 96x60
        payload = protocol.ImagePayload(60, 96, b"", EncodedImage.declared(data, 60, 96).content_hash(), layout, data)
        service.handle(rid.encode(), protocol.EncodeRequest(rid, [payload], "prefill", "127.0.0.1:1"))
    assert service.tick()
    reports = {msg.rid: msg for _, msg in service.runtime.sent}
    assert reports["ok"].ok and not reports["bad"].ok
    assert "decoded size 96x60 is not the 60x96 the router declared" in reports["bad"].error
    assert ImageLayout.from_wire(layout).num_tokens > 0 and not service.pending


def test_the_encoder_batches_by_image_tokens(qwen) -> None:
    """One vision forward takes requests in arrival order up to --max-batch-image-tokens; a request
    over it alone still runs (alone)."""
    from encoder_node.service import EncoderService

    config, _ = qwen
    sizes = [(96, 60), (96, 60), (200, 140), (96, 60)]
    service = EncoderService(config, "cpu", torch.float32)
    service.runtime = FakeRuntime()
    per_request = []
    for i, (w, h) in enumerate(sizes):
        data = rotated_jpeg(1, (w, h))
        layout = service.processor.layout(Image.new("RGB", (w, h))).to_wire()
        per_request.append(ImageLayout.from_wire(layout).num_tokens)
        payload = protocol.ImagePayload(w, h, b"", EncodedImage.declared(data, w, h).content_hash(), layout, data)
        service.handle(f"r{i}".encode(), protocol.EncodeRequest(f"r{i}", [payload], "prefill", "127.0.0.1:1"))
    service.max_batch_image_tokens = per_request[0] + per_request[1]   # the first two fit, the third not
    batches = []
    while service.pending:
        before = set(service.pending)
        assert service.tick()
        batches.append(sorted(before - set(service.pending)))
    assert per_request[2] > service.max_batch_image_tokens
    assert batches == [["r0", "r1"], ["r2"], ["r3"]]
    assert all(msg.ok for _, msg in service.runtime.sent)
