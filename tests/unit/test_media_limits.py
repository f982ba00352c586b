"""The router's trust boundaries for images: how many, how many pixels, decoded how many at once,
fetched from where. Network traffic stays on loopback: refused addresses are checked without a
socket, and the URL tests that must not connect go through a transport that records instead."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_media import _Handler, data_uri, encode, load_error, png, server  # noqa: F401
from test_router_app import MAX_CONTEXT, assert_error, make_client, prompts  # noqa: F401

from epd.media import encoded, loading
from epd.media.fetching import address_refusal
from epd.media.loading import MediaError, MediaLimits, PixelBudget, aload_image, load_image
from router.main import build_parser, main
from router.prompts import PromptBuilder
from router.settings import RouterSettings

LINK_LOCAL, PRIVATE = "a link-local / metadata address", "a private-network address"
PRIVATE_ON = MediaLimits(block_private_networks=True)


def teredo(client: str) -> str:
    """A Teredo address (2001::/32) whose client, stored inverted in the low 32 bits, is `client`."""
    inverted = ~int(ipaddress.IPv4Address(client)) & 0xFFFF_FFFF
    return str(ipaddress.IPv6Address((0x2001_0000_4136_E378 << 64) | (0x8000_63BF << 32) | inverted))


# ---------------------------------------------------------------- which addresses a URL may reach

@pytest.mark.parametrize("address", [
    "169.254.169.254", "::ffff:169.254.169.254", "::ffff:0:a9fe:a9fe",    # plain, IPv4-mapped, SIIT
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::a9fe:a9fe",                          # NAT64, well-known and local-use
    "2002:a9fe:a9fe::", "2002:a9fe:a9fe:1::5",                             # 6to4
    "::a9fe:a9fe", teredo("169.254.169.254"),                              # IPv4-compatible, Teredo
    "fe80::1", "fd00:ec2::254", "100.100.100.200", "64:ff9b::6464:64c8",  # other metadata services
])
def test_metadata_addresses_are_refused_in_every_encoding_by_default(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address), MediaLimits()) == LINK_LOCAL


@pytest.mark.parametrize("address", [
    "10.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::", "::a00:1", "::ffff:0:a00:1",
    "192.168.1.1", "2002:c0a8:101::", "fc00::1", teredo("10.0.0.1"),
    "127.0.0.1", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "0.0.0.0", "::",
])
def test_private_networks_are_refused_in_every_encoding_when_blocked(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert address_refusal(ip, PRIVATE_ON) == PRIVATE
    assert address_refusal(ip, MediaLimits()) is None, "loopback and private networks are allowed by default"


@pytest.mark.parametrize("address", ["8.8.8.8", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::",
                                     "2606:4700:4700::1111", teredo("8.8.8.8")])
def test_public_addresses_pass_in_every_encoding(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address), PRIVATE_ON) is None


def recording_client() -> tuple[httpx.AsyncClient, list[str]]:
    """A client whose requests are recorded and never leave the process."""
    sent: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(str(request.url))
        return httpx.Response(200, content=png())
    return httpx.AsyncClient(transport=httpx.MockTransport(handle)), sent


@pytest.mark.parametrize(("url", "limits", "refused"), [
    ("http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", MediaLimits(), LINK_LOCAL),
    ("http://[2002:a9fe:a9fe::]/latest/meta-data/", MediaLimits(), LINK_LOCAL),
    ("http://[::ffff:a9fe:a9fe]/latest/meta-data/", MediaLimits(), LINK_LOCAL),
    ("http://[::a9fe:a9fe]/latest/meta-data/", MediaLimits(), LINK_LOCAL),
    ("http://2852039166/latest/meta-data/", MediaLimits(), LINK_LOCAL),     # 169.254.169.254 as one number
    ("http://[::ffff:10.0.0.1]/admin.png", PRIVATE_ON, PRIVATE),
    ("http://[64:ff9b::a00:1]/admin.png", PRIVATE_ON, PRIVATE),
])
def test_encoded_internal_urls_are_refused_before_a_request_is_sent(url: str, limits: MediaLimits,
                                                                    refused: str) -> None:
    async def run() -> tuple[MediaError, list[str]]:
        client, sent = recording_client()
        async with client:
            with pytest.raises(MediaError) as info:
                await aload_image(url, limits=limits, client=client, param="messages[0].content[0].image_url.url")
        return info.value, sent

    err, sent = asyncio.run(run())
    assert f"resolves to {refused}" in str(err) and err.param == "messages[0].content[0].image_url.url"
    assert sent == []


def test_allowed_media_domains_refuse_other_hosts_and_redirects_to_them(server: str) -> None:  # noqa: F811
    port = server.rsplit(":", 1)[1]
    only_localhost = MediaLimits(allowed_domains=frozenset({"LocalHost."}))   # matched as a URL host is
    assert load_image(f"http://localhost:{port}/cat.png", limits=only_localhost).size == (6, 4)
    seen = len(_Handler.hosts)
    err = load_error(f"{server}/cat.png", limits=only_localhost, index=1)
    assert "image 2: URL host '127.0.0.1' is not one of the allowed media domains (localhost)" in str(err)
    assert len(_Handler.hosts) == seen, "a refused host must not be fetched from"
    err = load_error(f"http://localhost:{port}/elsewhere", limits=only_localhost)   # a 302 to 127.0.0.1
    assert "URL host '127.0.0.1' is not one of the allowed media domains" in str(err)
    assert _Handler.hosts[seen:] == [f"localhost:{port}"], "only the allowed first hop was fetched"


# ---------------------------------------------------------------- pixels: per image, per request

@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-bit 7000x7000 PNG: a few KB on the wire, 49 MP (147 MB as RGB) once decoded."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(encode(Image.new("1", (7000, 7000))))
    return path


_PEAK_RSS = """
import sys
from epd.media.loading import MediaError, MediaLimits, load_image

def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

data = open(sys.argv[1], "rb").read()
limits = MediaLimits(max_pixels=int(sys.argv[2]))
before = peak_kb()
try:
    load_image(data, limits=limits)
    outcome = "decoded"
except MediaError as exc:
    outcome = str(exc)
print((peak_kb() - before) // 1024, outcome)
"""


def peak_rss_growth_mb(image: Path, max_pixels: int) -> tuple[int, str]:
    """Load `image` in a fresh process: how much its peak RSS grew (MB), and the outcome."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(image), str(max_pixels)], capture_output=True,
                         text=True, check=True).stdout
    grown, outcome = out.strip().split(" ", 1)
    return int(grown), outcome


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_pixel_bomb_is_refused_from_its_header_in_little_memory(bomb: Path) -> None:
    """Refused under the default 25 MP per-image cap, the bomb grows the peak RSS by under 8 MB
    (measured: 0 MB); decoded (a 60 MP cap), the same file grows it by over 100 MB (measured: 233 MB)."""
    assert bomb.stat().st_size < 64 * 1024
    err = load_error(bomb.read_bytes(), index=2, param="messages[0].content[3].image_url.url")
    assert "image 3: size 7000x7000 = 49.0 MP is over the 25 MP per-image limit" in str(err)
    assert (err.index, err.param) == (2, "messages[0].content[3].image_url.url")
    refused_mb, outcome = peak_rss_growth_mb(bomb, MediaLimits.max_pixels)
    assert "over the 25 MP per-image limit" in outcome and refused_mb < 8
    decoded_mb, outcome = peak_rss_growth_mb(bomb, 60_000_000)
    assert outcome == "decoded" and decoded_mb > 100, "the measurement must see a decode"


def test_pixel_bomb_in_a_chat_request_is_a_400_naming_the_part(prompts, bomb: Path) -> None:  # noqa: F811
    client, backend = make_client(prompts)
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": data_uri(bomb.read_bytes())}}]
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    param = "messages[0].content[1].image_url.url"
    assert_error(resp, 400, param, "invalid_image", "7000x7000 = 49.0 MP is over the 25 MP per-image limit")
    assert not backend.requests


def test_a_request_budget_stops_the_image_that_crosses_it() -> None:
    """Three 100x100 images against 25,000 pixels: two decode, the one that would cross fails."""
    async def run() -> list[Image.Image | BaseException]:
        budget = PixelBudget(25_000)
        loads = [aload_image(png((100, 100)), budget=budget, index=i, param=f"p{i}") for i in range(3)]
        return await asyncio.gather(*loads, return_exceptions=True)

    results = asyncio.run(run())
    failed = [r for r in results if isinstance(r, MediaError)]
    assert len(failed) == 1 and sum(isinstance(r, Image.Image) for r in results) == 2
    assert f"image {failed[0].index + 1}: size 100x100 brings the request's images to 0.03 MP" in str(failed[0])
    assert "over the 0.025 MP per-request limit" in str(failed[0]) and failed[0].param == f"p{failed[0].index}"


def image_chat(urls: list[str]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "compare them"}]}]


def test_request_pixel_cap_through_the_router(tiny_models) -> None:
    capped = PromptBuilder(tiny_models["qwen2_vl"], MAX_CONTEXT, media_limits=MediaLimits(max_request_pixels=25_000))
    client, backend = make_client(capped)
    two = client.post("/v1/chat/completions", json={"messages": image_chat([data_uri(png((100, 100)))] * 2)})
    assert two.status_code == 200 and backend.requests[-1].images[1].size == (100, 100)
    resp = client.post("/v1/chat/completions", json={"messages": image_chat([data_uri(png((100, 100)))] * 3)})
    err = resp.json()["error"]      # which image crosses the cap depends on which decodes last
    assert err["param"] in {f"messages[0].content[{i}].image_url.url" for i in range(3)}
    assert_error(resp, 400, err["param"], "invalid_image", "0.03 MP, over the 0.025 MP per-request limit")
    assert len(backend.requests) == 1


# ---------------------------------------------------------------- --limit-mm-per-prompt

def test_image_count_limit_is_a_400_before_anything_is_fetched(tiny_models, server: str) -> None:  # noqa: F811
    limited = PromptBuilder(tiny_models["qwen2_vl"], MAX_CONTEXT, media_limits=MediaLimits(max_images=2))
    client, backend = make_client(limited)
    seen = len(_Handler.hosts)
    resp = client.post("/v1/chat/completions", json={"messages": image_chat([f"{server}/cat.png"] * 3)})
    assert_error(resp, 400, "messages[0].content[2].image_url.url",
                 text="At most 2 image(s) may be provided in one prompt; this request has 3")
    assert "--limit-mm-per-prompt" in resp.json()["error"]["message"]
    assert len(_Handler.hosts) == seen and not backend.requests, "nothing fetched, nothing sent on"
    ok = client.post("/v1/chat/completions", json={"messages": image_chat([f"{server}/cat.png"] * 2)})
    assert ok.status_code == 200 and len(_Handler.hosts) == seen + 2


@pytest.mark.parametrize("flag", ['{"image": 3}', "image=3", "image=3,video=0", '{"image": {"count": 3}}'])
def test_limit_mm_per_prompt_takes_vllms_forms(tiny_models, flag: str) -> None:
    args = build_parser().parse_args(["--model", tiny_models["qwen2_vl"], "--limit-mm-per-prompt", flag])
    assert RouterSettings.from_cli(args).media_limits.max_images == 3


def test_media_flags_reach_the_limits_and_default_to_the_library_defaults(tiny_models) -> None:
    model = tiny_models["qwen2_vl"]
    assert RouterSettings.from_cli(build_parser().parse_args(["--model", model])).media_limits == MediaLimits()
    args = build_parser().parse_args(["--model", model, "--max-image-pixels", "1000000", "--max-request-pixels",
                                      "3000000", "--allowed-media-domains", "images.example.com", "cdn.example.com",
                                      "--block-private-media-networks"])
    limits = RouterSettings.from_cli(args).media_limits
    assert (limits.max_pixels, limits.max_request_pixels, limits.block_private_networks) == (1_000_000, 3_000_000, True)
    assert limits.allowed_domains == {"images.example.com", "cdn.example.com"} and limits.block_link_local


def test_the_input_stage_checks_images_with_the_limits_it_is_given(tiny_models) -> None:
    """The router's limits, not the library defaults, govern the images it hands on (a raised
    --max-image-pixels is not undone later)."""
    from epd.config import ModelConfig, load_tokenizer
    from epd.engine.inputs import InputProcessor

    path = tiny_models["qwen2_vl"]
    prompt = "<|vision_start|><|image_pad|><|vision_end|>hi"
    image = Image.new("RGB", (40, 30))
    for limits, ok in ((MediaLimits(max_pixels=1000), False), (MediaLimits(max_pixels=2000), True)):
        inputs = InputProcessor(ModelConfig.from_pretrained(path), load_tokenizer(path), 4096, with_pixels=False,
                                limits=limits)
        if ok:
            assert inputs.process(prompt=prompt, image_data=[image]).images[0].num_tokens > 0
        else:
            with pytest.raises(MediaError, match="per-image limit"):
                inputs.process(prompt=prompt, image_data=[image])


@pytest.mark.parametrize(("argv", "message"), [
    (["--limit-mm-per-prompt", "image=-1"], "the limit must be a whole number >= 0"),
    (["--limit-mm-per-prompt", '{"pdf": 1}'], "unknown modality 'pdf'"),
    (["--limit-mm-per-prompt", "four"], "expected JSON like"),
    (["--max-request-pixels", "0"], "MediaLimits: sizes"),
])
def test_bad_media_flags_stop_the_router_at_start(tiny_models, capsys, argv: list[str], message: str) -> None:
    try:
        code = main(["--model", tiny_models["qwen2_vl"], *argv])
    except SystemExit as exc:      # argparse's own refusals
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- header reading at once, over all requests

class CallCounter:
    """Wraps a step: how many calls run now, the most at once, and how many in all. `hold_s`: each
    call takes at least so long (a header is read in well under a millisecond: overlap would be luck)."""

    def __init__(self, real, hold_s: float = 0.0) -> None:
        self.real, self.hold_s, self.now, self.peak, self.calls = real, hold_s, 0, 0, 0
        self._lock = threading.Lock()

    def __call__(self, *args, **kw):
        with self._lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.hold_s)
            return self.real(*args, **kw)
        finally:
            with self._lock:
                self.now -= 1


@pytest.mark.parametrize("threads", [2, 8])
def test_the_router_reads_headers_on_a_bounded_pool_and_decodes_nothing(tiny_models, monkeypatch,
                                                                        threads: int) -> None:
    """8 requests of 4 large images each, all at once: every image is read up to its header, never
    more than `decode_threads` at the same time (and the bound is reached); no pixel is decoded in the
    router, the sizes and layouts come from the headers."""
    decodes, probes = CallCounter(loading._decode), CallCounter(encoded.probe_bytes, hold_s=0.02)
    monkeypatch.setattr(loading, "_decode", decodes)
    monkeypatch.setattr(encoded, "probe_bytes", probes)
    builder = PromptBuilder(tiny_models["qwen2_vl"], 1 << 20, media_limits=MediaLimits(decode_threads=threads))
    uris = [data_uri(encode(Image.radial_gradient("L").resize((1024 + i, 768)).convert("RGB"))) for i in range(4)]

    async def run() -> list:
        try:
            return await asyncio.gather(*(builder.chat(image_chat(uris)) for _ in range(8)))
        finally:
            await builder.close()

    prepared = asyncio.run(run())
    assert all([im.size for im in p.images] == [(1024 + i, 768) for i in range(4)] for p in prepared)
    assert all(im.num_tokens > 0 for p in prepared for im in p.inp.images)
    assert probes.calls == 32 and decodes.calls == 0
    assert probes.peak <= threads
    assert probes.peak >= min(threads, 3), "header reads must overlap up to the bound"
