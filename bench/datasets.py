"""Workloads: the list of chat requests a benchmark run sends.

Lifecycle: ``build_requests(workload, count)`` is called once, before any traffic, and
returns ``count`` fully formed ``BenchRequest``s (images already encoded) so that request
preparation never sits inside a measured latency. Three sources:

- ``random``: random English words, about one token each (exact with ``--tokenizer``);
  input and output lengths uniform in ``[len * (1 - r), len * (1 + r)]``.
- ``random-image``: the same text split into pieces with ``images_per_request`` images
  interleaved as base64 data URIs (see ``images.py`` for repeats).
- ``jsonl``: one OpenAI chat request body per line (at least ``{"messages": [...]}``);
  lines are reused in order when the file is shorter than ``count``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.config import WorkloadConfig
from bench.images import ImageBank, plan_image_slots

# Short, common words: nearly every BPE vocabulary holds " word" as one token.
WORDS = (
    "the of and to in is was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him "
    "see time could no make than first been its who now people my made over did down only way "
    "find use may water long little very after words called just where most know get through "
    "back much go good new write our me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say "
    "small every found still between name should home big give air line set own under read last "
    "never us left end along while might next sound below saw something thought both few those "
    "always looked show large often together asked house world going want school important until "
    "form food keep children feet land side without boy once animals life enough took sometimes"
).split()

# Body keys the harness sets itself; everything else in a jsonl line is passed through.
_RESERVED_KEYS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n"}


class DatasetError(ValueError):
    """The workload cannot be built (missing or malformed dataset file, bad option)."""


class TextTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that exact-length prompts need."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One chat request as the client will send it."""

    messages: list[dict[str, Any]]
    max_tokens: int
    prompt_len: int  # text tokens of the prompt: counted with --tokenizer, else estimated
    num_images: int = 0
    image_ids: tuple[int, ...] = ()  # distinct-image id per image, to measure repeats
    extra_body: dict[str, Any] = field(default_factory=dict)


def load_tokenizer(path: str) -> TextTokenizer:
    from transformers import AutoTokenizer  # heavy import, only when asked for

    return AutoTokenizer.from_pretrained(path)


def sample_lengths(mean: int, range_ratio: float, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` integers uniform in ``[mean * (1 - r), mean * (1 + r)]``, never below 1."""
    low = max(1, math.floor(mean * (1.0 - range_ratio)))
    high = max(low, math.ceil(mean * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=count).tolist()


def random_text(num_tokens: int, rng: np.random.Generator, tokenizer: TextTokenizer | None) -> tuple[str, int]:
    """Random words of ``num_tokens`` tokens; returns (text, token count)."""
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=num_tokens)]
    text = " ".join(words)
    if tokenizer is None:
        return text, num_tokens
    return fit_to_tokens(text, num_tokens, tokenizer, rng)


def fit_to_tokens(text: str, num_tokens: int, tokenizer: TextTokenizer, rng: np.random.Generator) -> tuple[str, int]:
    """Trim or extend ``text`` until it encodes to exactly ``num_tokens`` tokens (or close)."""
    count = 0
    for _ in range(8):
        ids = tokenizer.encode(text, add_special_tokens=False)
        while len(ids) < num_tokens:
            text += " " + " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=num_tokens))
            ids = tokenizer.encode(text, add_special_tokens=False)
        # decode/encode is not always a round trip at the cut, hence the retries
        text = tokenizer.decode(ids[:num_tokens])
        count = len(tokenizer.encode(text, add_special_tokens=False))
        if count == num_tokens:
            break
    return text, count


def _split_words(text: str, pieces: int) -> list[str]:
    words = text.split(" ")
    bounds = np.linspace(0, len(words), pieces + 1).round().astype(int)
    return [" ".join(words[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def build_random(cfg: WorkloadConfig, count: int, tokenizer: TextTokenizer | None = None) -> list[BenchRequest]:
    """Text-only or text+image random requests (``cfg.dataset`` picks which)."""
    rng = np.random.default_rng(cfg.seed)
    input_lens = sample_lengths(cfg.random_input_len, cfg.random_range_ratio, count, rng)
    output_lens = sample_lengths(cfg.random_output_len, cfg.random_range_ratio, count, rng)
    per_request = cfg.images_per_request if cfg.dataset == "random-image" else 0
    slots = plan_image_slots(count * per_request, cfg.image_repeat_ratio, rng)
    bank = ImageBank(cfg.image_resolution, cfg.image_content, cfg.image_format, cfg.seed + 1)
    requests = []
    for i in range(count):
        text, prompt_len = random_text(input_lens[i], rng, tokenizer)
        ids = tuple(slots[i * per_request : (i + 1) * per_request])
        if ids:
            content: Any = []
            for piece, image_id in zip(_split_words(text, len(ids) + 1), (*ids, None), strict=True):
                if piece:
                    content.append({"type": "text", "text": piece})
                if image_id is not None:
                    content.append({"type": "image_url", "image_url": {"url": bank.uri(image_id)}})
        else:
            content = text
        requests.append(
            BenchRequest(
                messages=[{"role": "user", "content": content}],
                max_tokens=output_lens[i],
                prompt_len=prompt_len,
                num_images=len(ids),
                image_ids=ids,
            )
        )
    return requests


def _text_of(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """All text in ``messages`` and the number of image parts."""
    texts, images = [], 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") in ("image_url", "input_image", "image"):
                images += 1
    return "\n".join(texts), images


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Request bodies, one per non-empty line; each must hold a ``messages`` list."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{path}:{lineno}: not JSON ({exc})") from exc
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise DatasetError(f"{path}:{lineno}: each line needs a 'messages' list")
        rows.append(body)
    if not rows:
        raise DatasetError(f"{path} holds no requests")
    return rows


def build_jsonl(cfg: WorkloadConfig, count: int, tokenizer: TextTokenizer | None = None) -> list[BenchRequest]:
    """Requests read from ``cfg.dataset_path``; ``max_tokens`` defaults to ``random_output_len``."""
    if not cfg.dataset_path:
        raise DatasetError("--dataset jsonl needs --dataset-path FILE.jsonl")
    rows = read_jsonl(cfg.dataset_path)
    requests = []
    for i in range(count):
        body = rows[i % len(rows)]
        text, images = _text_of(body["messages"])
        prompt_len = len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else len(text.split())
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or cfg.random_output_len
        requests.append(
            BenchRequest(
                messages=body["messages"],
                max_tokens=int(max_tokens),
                prompt_len=prompt_len,
                num_images=images,
                extra_body={k: v for k, v in body.items() if k not in _RESERVED_KEYS},
            )
        )
    return requests


def build_requests(cfg: WorkloadConfig, count: int) -> list[BenchRequest]:
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if cfg.dataset in ("random", "random-image"):
        return build_random(cfg, count, tokenizer)
    if cfg.dataset == "jsonl":
        return build_jsonl(cfg, count, tokenizer)
    raise DatasetError(f"unknown dataset {cfg.dataset!r}: use random, random-image or jsonl")
