"""Helpers for tests that talk to the HTTP API with the real `openai` client: starting a server
process, a local http.server for image URLs, message parts, and the `transformers` reference for a
chat message."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import hf_generate, noise_image, png_bytes

from epd.config import ModelConfig
from epd.engine.inputs import InputProcessor
from epd.media.loading import load_image

IDS = {"logprobs": True, "extra_body": {"return_tokens_as_token_ids": True}}   # answers carry token ids
REPO = Path(__file__).resolve().parents[1]


def start_until_line(cmd: list[str], marker: str, timeout_s: float, what: str,
                     env: dict[str, str] | None = None) -> tuple[subprocess.Popen, list[str], str]:
    """Start `cmd` in the repository root, collect its output lines, and return once one starts
    with `marker`: (process, the output so far and to come, that line). Fails the test otherwise."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            log.append(line)
            if line.startswith(marker):
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(timeout_s):
        proc.kill()
        pytest.fail(f"{what} did not become ready:\n" + "".join(log))
    return proc, log, next(line for line in log if line.startswith(marker))


@dataclass
class Media:
    base_url: str
    allowed_dir: Path
    images: dict[str, bytes]

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


@contextlib.contextmanager
def serve_media(root: Path) -> Iterator[Media]:
    """Two noise PNGs and a web page posing as one over http; a third PNG under root/allowed."""
    images = {"a.png": png_bytes(noise_image(120, 80, seed=1)), "b.png": png_bytes(noise_image(64, 150, seed=2)),
              "not-an-image.png": b"<html>this is a web page, not a picture</html>"}
    for name, data in images.items():
        (root / name).write_bytes(data)
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "c.png").write_bytes(png_bytes(noise_image(90, 90, seed=3)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None   # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield Media(f"http://127.0.0.1:{httpd.server_address[1]}", allowed, images)
    finally:
        httpd.shutdown()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def reference(model_path: str, content: list[dict], images: list[bytes], max_tokens: int,
              logit_bias: dict[int, float] | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy output ids) from the tokenizer's own chat template (with the BOS that
    transformers' processor adds) and transformers (with `logit_bias` added to its logits)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    hf_content = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
    text = tok.apply_chat_template([{"role": "user", "content": hf_content}], tokenize=False,
                                   add_generation_prompt=True)
    if tok.bos_token and not text.startswith(tok.bos_token) and tok("x")["input_ids"][0] == tok.bos_token_id:
        text = tok.bos_token + text   # what transformers' processor does when it tokenizes a chat
    pil = [load_image(b) for b in images]
    inp = InputProcessor(ModelConfig.from_pretrained(model_path), tok, 4096).process(prompt=text, image_data=pil)
    return inp.input_ids, hf_generate(model_path, inp.input_ids, pil, max_tokens, logit_bias=logit_bias)


def token_ids(resp) -> list[int]:
    return [int(entry.token.removeprefix("token_id:")) for entry in resp.choices[0].logprobs.content]


def assert_matches(resp, prompt_ids: list[int], expected: list[int], max_tokens: int = 10) -> None:
    assert token_ids(resp) == expected
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(expected)
    assert resp.usage.total_tokens == len(prompt_ids) + len(expected)
    assert resp.choices[0].finish_reason == ("length" if len(expected) == max_tokens else "stop")
