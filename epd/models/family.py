"""The model seam: what a family of checkpoints gives the engine, the nodes and the router.

A family is one package `epd/models/<family>/` exposing `FAMILY` (a `ModelFamily` subclass) and
`write_tiny` (its random-checkpoint builder), plus one line per `model_type` in the registry
(`epd/models/__init__.py`). Outside `epd/models/` nothing names a family concept (patch grids,
merge sizes, M-RoPE, anyres crops): an image travels as an `ImageLayout` (its prompt tokens and
the family's own numbers), the state decode needs beyond the KV as a `DecodeState`, pixels as the
family's preprocessed object, which only its own vision encoder reads.

Lifecycle: `ModelConfig.from_pretrained(path)` reads config.json, finds the family by model_type
and builds it (`FAMILY(path, raw_config, hf_config)`); the family fills the engine's
`TextConfig` and token ids. Then, per process, as its role needs: `build_lm` (the language model
over the paged KV cache, weights loaded), `build_vision` (vision tower + projector),
`image_processor`; per request: `expand` (placeholders -> image tokens), `positions` (+ the
request's `DecodeState`), `precomputed_layout` (embeddings handed in instead of pixels).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from epd.errors import InputError


@dataclass(frozen=True)
class ImageLayout:
    """How one image sits in a prompt: what the router computes from the image's size, the
    encoder's output must match, and the prefill node needs to place the embeddings."""
    num_tokens: int              # prompt tokens the image spans once expanded (= embedding rows)
    dims: tuple[int, ...] = ()   # the family's own description of it (opaque outside the family)

    def to_wire(self) -> list[int]:
        return [self.num_tokens, *self.dims]

    @classmethod
    def from_wire(cls, values: Any) -> ImageLayout:
        if not isinstance(values, list | tuple) or not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31 for v in values):
            raise ValueError(f"an image layout is a list of non-negative ints, got {values!r}")
        return cls(values[0], tuple(values[1:]))


@dataclass
class DecodeState:
    """What decode needs from the prompt beyond its KV: it travels with the KV hand-over."""
    position_offset: int = 0     # a token at sequence index i (past the prompt) has position i + offset

    def to_wire(self) -> dict[str, Any]:
        return {"position_offset": self.position_offset}

    @classmethod
    def from_wire(cls, data: Any) -> DecodeState:
        offset = data.get("position_offset") if isinstance(data, dict) else None
        if not isinstance(offset, int) or isinstance(offset, bool) or abs(offset) >= 1 << 31:
            raise ValueError(f"decode state: position_offset must be an int, got {data!r}")
        return cls(offset)


class Preprocessed(Protocol):
    """A family's preprocessed image: what its vision encoder takes."""
    layout: ImageLayout

    def content_key(self) -> str:
        """Identity of the encoder's input (equal keys give equal embeddings: prefix caching)."""
        ...


class ImageProcessor(Protocol):
    def layout(self, image: Image.Image, count: int = 1) -> ImageLayout:
        """The image's layout in a request of `count` images, from its size alone (cheap: the
        router). A family may lay an image out differently when a request has several."""
        ...

    def preprocess_many(self, images: list[Image.Image],
                        layouts: list[ImageLayout] | None = None) -> list[Preprocessed]:
        """Each image preprocessed for its layout (default: `layout(image)`)."""
        ...


class VisionEncoder(Protocol):
    device: torch.device

    def encode(self, images: list[Preprocessed]) -> list[torch.Tensor]:
        """One batched forward -> per image its embeddings [layout.num_tokens, text hidden]."""
        ...


class ModelFamily:
    """Base of every family: defaults for early-fusion models with 1-D RoPE (each image one
    placeholder token, expanded to one token per embedding row). Subclasses set `text`,
    `image_token_id` and `eos_token_ids` in `__init__` and override what differs."""

    position_rows = 1            # rows of the positions tensor (M-RoPE: 3)
    # Images reach the text model through cross-attention layers (their encoder output becomes
    # KV rows of those layers, `cross_rows`) instead of replacing prompt tokens' embeddings.
    cross_attention = False
    text: Any                    # epd.config.TextConfig
    image_token_id: int
    eos_token_ids: tuple[int, ...]

    def __init__(self, path: str, raw: dict[str, Any], hf: Any) -> None:
        self.path = path
        self.raw = raw
        self.hf = hf

    # ---- models ---------------------------------------------------------------------------------
    def build_lm(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        raise NotImplementedError

    def build_vision(self, device: torch.device | str, dtype: torch.dtype) -> VisionEncoder:
        raise NotImplementedError

    def reference_vision(self, device: torch.device | str, dtype: torch.dtype) -> VisionEncoder:
        """transformers' own vision path on the checkpoint's weights (what GPU tests and benchmarks
        compare `build_vision`'s against)."""
        raise NotImplementedError

    def image_processor(self, on_device: bool = False) -> ImageProcessor:
        """on_device: the vision tower runs on a GPU (a family may move work there)."""
        raise NotImplementedError

    def weight_name(self, raw: str) -> str | None:
        """A checkpoint tensor's name in our modules: `language_model.*` / `lm_head.*` (the LM),
        `vision.*` (vision tower and projector), None to skip it."""
        raise NotImplementedError

    def weights(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, tensor) of every checkpoint tensor whose name starts with `prefix`."""
        from epd.models.weights import iter_weights

        for raw, tensor_fn in iter_weights(self.path):
            name = self.weight_name(raw)
            if name is not None and name.startswith(prefix):
                yield name, tensor_fn()

    # ---- prompts --------------------------------------------------------------------------------
    def expand(self, ids: list[int], layouts: list[ImageLayout]) -> list[int]:
        """Each image placeholder -> `num_tokens` copies; an already expanded prompt is kept."""
        pad = self.image_token_id
        if image_starts(ids, pad, [lay.num_tokens for lay in layouts]) is not None:
            return ids
        return replace_placeholders(ids, pad, layouts, lambda layout: [pad] * layout.num_tokens)

    def check_expanded(self, ids: list[int], layouts: list[ImageLayout]) -> list[int]:
        """Where each image's tokens start in an expanded prompt; InputError when they do not match."""
        counts = [lay.num_tokens for lay in layouts]
        starts = image_starts(ids, self.image_token_id, counts)
        if starts is None:
            raise InputError(f"image placeholder runs {placeholder_runs(ids, self.image_token_id)} do not match "
                             f"the images' token counts {counts}", "input_ids")
        return starts

    def positions(self, ids: list[int], layouts: list[ImageLayout]) -> tuple[torch.Tensor, DecodeState]:
        """Positions [position_rows, len(ids)] of an expanded prompt, and the request's decode state."""
        return torch.arange(len(ids), dtype=torch.long)[None], DecodeState()

    def embedding_rows(self, layout: ImageLayout) -> int:
        """Rows of the vision encoder's output for an image of this layout."""
        return self.cross_rows(layout)[0] if self.cross_attention else layout.num_tokens

    def embedding_offsets(self, layout: ImageLayout) -> list[int] | None:
        """Where an image's embedding rows go among its `num_tokens` prompt tokens, in row order;
        None: one row per token, all of them (a family whose image tokens interleave with others
        names them)."""
        return None

    def wire_embedding_rows(self, values: Any) -> int:
        """`embedding_rows` of a layout as it travels; 0 for one that is not this family's (refused
        with the reason where the layout is checked)."""
        try:
            return self.embedding_rows(ImageLayout.from_wire(values))
        except (ValueError, IndexError):
            return 0

    def cross_rows(self, layout: ImageLayout) -> tuple[int, int]:
        """(KV rows an image of this layout adds to each cross-attention layer, how many of them
        leading ones a token that sees the image attends to). Cross-attention families only."""
        raise NotImplementedError

    def cross_spans(self, ids: list[int], starts: list[int]) -> list[tuple[int, int]]:
        """Per image (its placeholder at `starts[i]`), the prompt tokens [first, end) that see it;
        end -1: the rest of the prompt and every generated token. A token that sees no image
        attends to every row of every image and skips the layer's MLP. Cross-attention families."""
        raise NotImplementedError

    def precomputed_layout(self, item: dict[str, Any], embeddings: torch.Tensor, index: int,
                           ids: list[int] | None = None) -> ImageLayout:
        """The layout of embeddings handed in instead of pixels (the projector's output, one row
        per image token), image `index` of the prompt `ids`; InputError naming what is wrong."""
        where = f"image_data[{index}]"
        if embeddings.dim() != 2 or embeddings.shape[1] != self.text.hidden_size or not embeddings.shape[0]:
            raise InputError(f"image {index}: precomputed_embeddings has shape {tuple(embeddings.shape)}, expected "
                             f"(tokens, {self.text.hidden_size})", where)
        return ImageLayout(int(embeddings.shape[0]))

    def check_layout(self, layout: ImageLayout) -> None:
        """Raise ValueError unless `layout` is one this family's processor can produce (a layout
        from the wire is checked before anything is sized by it)."""
        if not 0 < layout.num_tokens <= self.text.max_position_embeddings:
            raise ValueError(f"an image of {layout.num_tokens} tokens")

    @property
    def model_id(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def replace_placeholders(ids: list[int], placeholder: int, layouts: list[ImageLayout],
                         tokens_of: Callable[[ImageLayout], list[int]]) -> list[int]:
    """`ids` with its i-th `placeholder` replaced by `tokens_of(layouts[i])`; InputError when the
    placeholders and the images do not pair up."""
    count = sum(1 for t in ids if t == placeholder)
    if count != len(layouts):
        raise InputError(f"the prompt has {count} image placeholder(s) but {len(layouts)} image(s) were given",
                         "image_data")
    out: list[int] = []
    it = iter(layouts)
    for t in ids:
        out.extend(tokens_of(next(it)) if t == placeholder else [t])
    return out


_preprocess_pool: ThreadPoolExecutor | None = None


def preprocess_on_threads(preprocess: Callable[[Image.Image], Any], images: list[Image.Image]) -> list[Any]:
    """`preprocess` of each image, in order; several images run on a few threads, shared by every
    processor of the process (PIL's resize and numpy's copies let go of the GIL: 4 x 720p
    167 -> 108 ms on 2 cores, Qwen2-VL)."""
    global _preprocess_pool
    if len(images) < 2:
        return [preprocess(im) for im in images]
    if _preprocess_pool is None:
        _preprocess_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                              thread_name_prefix="epd-preprocess")
    return list(_preprocess_pool.map(preprocess, images))


def image_starts(ids: list[int], token: int, counts: list[int]) -> list[int] | None:
    """Where each image starts when the `token`s of `ids` are the images' tokens in order, each
    image's contiguous (adjacent images may share a run); None when they are not."""
    where = [i for i, t in enumerate(ids) if t == token]
    if len(where) != sum(counts):
        return None
    starts, k = [], 0
    for n in counts:
        if n < 1 or where[k + n - 1] - where[k] != n - 1:
            return None
        starts.append(where[k])
        k += n
    return starts


def placeholder_runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the runs of `token` in `ids`, in order."""
    runs, n = [], 0
    for t in ids:
        if t == token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    if n:
        runs.append(n)
    return runs
