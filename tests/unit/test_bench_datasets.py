"""Workloads: lengths, images (size, format, repeats) and jsonl requests as asked for."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.config import WorkloadConfig, parse_resolution
from bench.datasets import BenchRequest, build_random, build_requests, fit_to_tokens


def _images(req: BenchRequest) -> list[str]:
    return [p["image_url"]["url"] for p in req.messages[0]["content"] if p["type"] == "image_url"]


def _decode(uri: str) -> Image.Image:
    header, payload = uri.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_random_lengths_stay_in_the_asked_range() -> None:
    cfg = WorkloadConfig(random_input_len=100, random_output_len=50, random_range_ratio=0.2, seed=3)
    reqs = build_requests(cfg, 200)
    inputs = [len(r.messages[0]["content"].split()) for r in reqs]
    outputs = [r.max_tokens for r in reqs]
    assert [r.prompt_len for r in reqs] == inputs  # one random word per estimated token
    assert min(inputs) >= 80 and max(inputs) <= 120 and len(set(inputs)) > 20
    assert min(outputs) >= 40 and max(outputs) <= 60
    assert np.mean(outputs) == pytest.approx(50, abs=2)
    fixed = build_requests(WorkloadConfig(random_input_len=64, random_output_len=8), 5)
    assert {r.prompt_len for r in fixed} == {64} and {r.max_tokens for r in fixed} == {8}
    assert len({r.messages[0]["content"] for r in fixed}) == 5  # no accidental shared prefix


def test_same_seed_same_workload_other_seed_other_workload() -> None:
    a, b = build_requests(WorkloadConfig(seed=1), 3), build_requests(WorkloadConfig(seed=1), 3)
    c = build_requests(WorkloadConfig(seed=2), 3)
    assert [r.messages for r in a] == [r.messages for r in b]
    assert [r.messages for r in a] != [r.messages for r in c]


@pytest.mark.parametrize(("fmt", "content", "resolution"), [("png", "random", "64x48"), ("jpeg", "blank", "720p")])
def test_random_image_requests_carry_images_of_the_asked_kind(fmt: str, content: str, resolution: str) -> None:
    cfg = WorkloadConfig(
        dataset="random-image",
        images_per_request=2,
        image_resolution=parse_resolution(resolution),
        image_content=content,
        image_format=fmt,
        random_input_len=30,
    )
    reqs = build_requests(cfg, 2)
    for req in reqs:
        parts = req.messages[0]["content"]
        assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
        assert sum(len(p["text"].split()) for p in parts if p["type"] == "text") == 30
        assert req.num_images == 2
        for uri in _images(req):
            image = _decode(uri)
            assert image.format == fmt.upper()
            assert image.size == cfg.image_resolution
            assert uri.startswith(f"data:image/{fmt};")
    assert parse_resolution("1080p") == (1920, 1080)


def test_image_repeat_ratio_holds() -> None:
    cfg = WorkloadConfig(
        dataset="random-image", images_per_request=2, image_resolution=(16, 16), image_repeat_ratio=0.25
    )
    reqs = build_random(cfg, 40)
    uris = [uri for r in reqs for uri in _images(r)]
    assert len(uris) == 80
    assert len(set(uris)) == 80 - 20  # exactly a quarter of the images recur
    ids = [i for r in reqs for i in r.image_ids]
    assert len(set(ids)) == len(set(uris))  # the ids name the distinct images
    no_repeat = build_random(WorkloadConfig(dataset="random-image", images_per_request=3, image_resolution=(8, 8)), 10)
    assert len({u for r in no_repeat for u in _images(r)}) == 30
    blank = build_random(WorkloadConfig(dataset="random-image", image_resolution=(8, 8), image_content="blank"), 10)
    assert len({u for r in blank for u in _images(r)}) == 10  # blank but still distinct


def test_jsonl_requests_keep_messages_and_max_tokens(tmp_path: Path) -> None:
    lines = [
        {"messages": [{"role": "user", "content": "describe a cat"}], "max_tokens": 7, "top_p": 0.5},
        {
            "model": "ignored",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is here"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                },
            ],
        },
    ]
    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    reqs = build_requests(WorkloadConfig(dataset="jsonl", dataset_path=str(path), random_output_len=33), 5)
    assert len(reqs) == 5  # the file is reused in order when it is shorter
    assert [r.max_tokens for r in reqs] == [7, 33, 7, 33, 7]
    assert reqs[0].extra_body == {"top_p": 0.5} and reqs[1].extra_body == {}
    assert reqs[1].messages == lines[1]["messages"]
    assert (reqs[1].num_images, reqs[1].prompt_len) == (1, 5)


class _CharTokenizer:
    """One token per character: words are several tokens, so prompts must be cut."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class _PairTokenizer:
    """One token per two words: the first draft of words is too short and must be extended."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        words = text.split()
        pairs = [" ".join(words[i : i + 2]) for i in range(0, len(words), 2)]
        return [self.vocab.setdefault(p, len(self.vocab)) for p in pairs]

    def decode(self, ids: list[int]) -> str:
        inverse = {v: k for k, v in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)


@pytest.mark.parametrize("tokenizer", [_CharTokenizer(), _PairTokenizer()])
def test_prompts_fit_a_tokenizer_exactly(tokenizer: _CharTokenizer | _PairTokenizer) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 17, 128):
        text, count = fit_to_tokens("the cat sat on the mat " * 5, n, tokenizer, rng)
        assert count == n
        assert len(tokenizer.encode(text)) == n
    for req in build_random(WorkloadConfig(random_input_len=40), 3, tokenizer):
        assert req.prompt_len == 40
        assert len(tokenizer.encode(req.messages[0]["content"])) == 40
