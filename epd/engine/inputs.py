"""Turn a prompt (text or token ids) plus images into what the model consumes.

`InputProcessor.process` tokenizes, loads the images and asks the family for each one's layout
(from its size: cheap), accepts precomputed embeddings, expands each image placeholder to the
image's token count (`ModelFamily.expand`), and computes positions and the request's decode state
(`ModelFamily.positions`). With pixels (a process that runs the vision tower) the images are
preprocessed too (`preprocess`, or `process(..., with_pixels=True)`); the router processes a
request once without them, reading only each image's header (`epd.media.encoded`), and sends the
encoded bytes on: an `EncodedImage` source is decoded only where it is preprocessed. Mismatches
between placeholders and images, and prompts longer than the context, raise `InputError` naming
the problem; nothing is allocated before this succeeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from epd.config import ModelConfig
from epd.errors import InputError
from epd.media.encoded import EncodedImage, decode_many, probe_image
from epd.media.loading import DEFAULT_LIMITS, MediaLimits, image_content_hash, load_image
from epd.models.family import DecodeState, ImageLayout

__all__ = ["ImageInput", "InputError", "InputProcessor", "ProcessedInput", "build_processed", "outside_vocabulary"]


@dataclass
class ImageInput:
    layout: ImageLayout
    pixels: Any = None                         # the family's preprocessed image, when the vision tower runs here
    embeddings: torch.Tensor | None = None     # [num_tokens, hidden], once encoded
    content_hash: str | None = None            # the image's identity: embedding-cache and prefix-cache key
    source: Any = None                         # PIL image or EncodedImage, while pixels are left to do
    source_rgb: bytes | None = None            # a PIL source's raw RGB bytes (what a node is sent)

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def source_data(self) -> bytes:
        """An EncodedImage source's bytes (what a node is sent, to decode itself); b"" otherwise."""
        return self.source.data if isinstance(self.source, EncodedImage) else b""


@dataclass
class ProcessedInput:
    input_ids: list[int]
    images: list[ImageInput]
    positions: torch.Tensor                    # [position_rows, len(input_ids)]
    decode_state: DecodeState = field(default_factory=DecodeState)
    image_offsets: list[int] = field(default_factory=list)  # index of each image's first token
    # cross-attention families: per image (its KV rows, the leading rows a token that sees it reads)
    # and the tokens [first, end) that see it (end -1: to the end, generated tokens too)
    cross_rows: list[tuple[int, int]] = field(default_factory=list)
    cross_spans: list[tuple[int, int]] = field(default_factory=list)
    # per image, where its embedding rows go among its tokens (ModelFamily.embedding_offsets); [] all of them
    row_offsets: list[list[int] | None] = field(default_factory=list)

    @property
    def num_cross_rows(self) -> int:
        return sum(rows for rows, _ in self.cross_rows)


class InputProcessor:
    def __init__(self, config: ModelConfig, tokenizer: Any, max_context: int, with_pixels: bool = True,
                 resize_on_device: bool = False, image_keys: bool = True,
                 limits: MediaLimits = DEFAULT_LIMITS) -> None:
        """with_pixels=False (the router): images get their layout from their size only; the
        encoder node preprocesses the pixels. resize_on_device: the vision tower is on a GPU (see
        the family's image processor). image_keys=False (a prompt check that only counts tokens):
        images get no raw RGB copy and no content hash (~3 ms a 720p image). limits: what an image
        may be (the router's own, for the images it fetched and checked with them)."""
        self.limits = limits
        self.with_pixels = with_pixels
        self.image_keys = image_keys
        self.config = config
        self.family = config.family
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.image_processor = self.family.image_processor(resize_on_device)

    def process(self, prompt: str | None = None, input_ids: list[int] | None = None,
                image_data: list | None = None) -> ProcessedInput:
        if (prompt is None) == (input_ids is None):
            raise InputError("give exactly one of prompt or input_ids", "prompt")
        ids = list(input_ids) if input_ids is not None else self._tokenize(prompt)
        if not ids:
            raise InputError("the prompt is empty", "prompt")
        items = list(image_data or [])
        loaded = {i: self._load(item, i) for i, item in enumerate(items) if not isinstance(item, dict)}
        images = [self._precomputed(i, item, ids) if isinstance(item, dict) else self._image(loaded[i], len(items))
                  for i, item in enumerate(items)]
        if self.with_pixels:
            self.preprocess(images)
        ids = self.family.expand(ids, [im.layout for im in images])
        if len(ids) >= self.max_context:
            raise InputError(f"prompt is {len(ids)} tokens (text + images); the context is {self.max_context} "
                             f"tokens and at least one must be left to generate", "prompt")
        return build_processed(self.config, ids, images)

    def _tokenize(self, prompt: str) -> list[int]:
        """A complete prompt's ids (its BOS text included, no special tokens added). A BOS in front
        is its own token and the rest is tokenized alone, as transformers' processor does (a
        SentencePiece tokenizer then starts the rest as a new word)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and prompt.startswith(bos):
            return [self.tokenizer.bos_token_id, *self.tokenizer.encode(prompt[len(bos):], add_special_tokens=False)]
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _load(self, item: Any, index: int) -> Image.Image | EncodedImage:
        """An item as a source: an EncodedImage (checked where it was made) as it is; without pixels
        here, anything but a PIL image is read up to its header only; else loaded (decoded)."""
        if isinstance(item, EncodedImage):
            return item
        if self.with_pixels or isinstance(item, Image.Image):
            return load_image(item, index=index, allow_any_local=True, limits=self.limits)
        return probe_image(item, index=index, allow_any_local=True, limits=self.limits)

    def preprocess(self, images: list[ImageInput]) -> None:
        """Preprocess the images that have a source and no pixels or embeddings yet (several on a
        few threads; EncodedImage sources decoded first, each held to its size); each keeps its
        layout, which must be the one its size gave."""
        todo = [im for im in images if im.source is not None and im.pixels is None and im.embeddings is None]
        if not todo:
            return
        encoded = [(i, im) for i, im in enumerate(images) if isinstance(im.source, EncodedImage)
                   and im.pixels is None and im.embeddings is None]
        decoded = decode_many([im.source for _, im in encoded], [i for i, _ in encoded])
        for (_, im), pil in zip(encoded, decoded, strict=True):
            im.source = pil
        pres = self.image_processor.preprocess_many([im.source for im in todo], [im.layout for im in todo])
        for im, pre in zip(todo, pres, strict=True):
            if pre.layout != im.layout:
                raise InputError(f"image layout {pre.layout.to_wire()} after preprocessing, "
                                 f"{im.layout.to_wire()} expected", "image_data")
            im.pixels, im.source, im.source_rgb = pre, None, None
            if self.image_keys:   # the pixels' identity names the image for prefix caching
                im.content_hash = pre.content_key()

    def _image(self, image: Image.Image | EncodedImage, count: int) -> ImageInput:
        im = ImageInput(self.image_processor.layout(image, count), source=image)
        if self.image_keys and not self.with_pixels:
            self.attach_sources([im])
        return im

    @staticmethod
    def attach_sources(images: list[ImageInput]) -> None:
        """Each image's content hash and, for a PIL source, its raw RGB bytes (what a node is sent;
        an EncodedImage's bytes go as they are), where not made yet."""
        for im in images:
            if isinstance(im.source, EncodedImage):
                im.content_hash = im.content_hash or im.source.content_hash()
            elif im.source is not None and im.source_rgb is None:
                im.source_rgb = im.source.tobytes()
                im.content_hash = image_content_hash(im.source, im.source_rgb)

    def _precomputed(self, index: int, item: dict, ids: list[int]) -> ImageInput:
        modality = str(item.get("modality", "IMAGE")).upper()
        if modality != "IMAGE":
            raise InputError(f"image {index}: unsupported modality {modality!r}", f"image_data[{index}]")
        emb = item.get("precomputed_embeddings")
        if emb is None:
            raise InputError(f"image {index}: a precomputed item needs 'precomputed_embeddings'",
                             f"image_data[{index}]")
        emb = torch.as_tensor(emb)
        return ImageInput(self.family.precomputed_layout(item, emb, index, ids), embeddings=emb)


def outside_vocabulary(ids: Sequence[int], vocab_size: int) -> str | None:
    """Why `ids` cannot be used with this vocabulary (the first id outside it), or None."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    return None if bad is None else f"token id {bad} is outside the vocabulary (size {vocab_size})"


def build_processed(config: ModelConfig, ids: list[int], images: list[ImageInput]) -> ProcessedInput:
    """Validate an expanded prompt against its images; positions and decode state from the family."""
    why = outside_vocabulary(ids, config.text.prompt_vocab_size)
    if why is not None:
        raise InputError(why, "input_ids")
    family, layouts = config.family, [im.layout for im in images]
    starts = family.check_expanded(ids, layouts)
    positions, state = family.positions(ids, layouts)
    out = ProcessedInput(ids, images, positions, state, starts)
    offsets = [family.embedding_offsets(layout) for layout in layouts]
    if any(o is not None for o in offsets):
        out.row_offsets = offsets
    if family.cross_attention and images:
        out.cross_rows = [family.cross_rows(layout) for layout in layouts]
        out.cross_spans = family.cross_spans(ids, starts)
    return out
