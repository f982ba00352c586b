"""Llama-3.2-Vision (`mllama`) on the model seam: a cross-attention family.

An image is one `<|image|>` token in the prompt (a real token of the input embedding, not
replaced); the vision encoder's output for it, [max_num_tiles * P, text hidden] (P: a tile's
patches + class token), becomes KV rows of every cross-attention layer (`cross_rows`: all of an
image's rows, of which a token that sees it reads the leading `tiles * P`, its real tiles; a token
that sees no image reads every row, padding tiles included, as transformers' mask does).
Which tokens see which image is transformers' `get_cross_attention_token_mask` (`cross_spans`):
an image from its token to the next image's token; consecutive image tokens all reach the
first later image (or the end); the last image (or run) to the end of the prompt and every
generated token. Positions are 1-D (Llama 3 RoPE), so the decode state is empty.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from epd.config import eos_ids, text_config
from epd.errors import InputError
from epd.models.family import ImageLayout, ModelFamily
from epd.models.mllama.names import weight_name


class MllamaFamily(ModelFamily):
    cross_attention = True

    def __init__(self, path: str, raw: dict[str, Any], hf: Any) -> None:
        super().__init__(path, raw, hf)
        tc, vc = hf.text_config, hf.vision_config
        self.text = dataclasses.replace(text_config(tc, raw, qkv_bias=False), embed_vocab_size=tc.vocab_size + 8)
        self.cross_layers = tuple(int(i) for i in tc.cross_attention_layers)
        self.image_token_id = hf.image_token_index
        self.eos_token_ids = eos_ids(path, tc)
        self.tile_rows = (vc.image_size // vc.patch_size) ** 2 + 1   # a tile's patches + its class token
        self.max_tiles = int(vc.max_num_tiles)
        self._processor = None

    # ---- models ---------------------------------------------------------------------------------
    def build_lm(self, device: torch.device, dtype: torch.dtype):
        from epd.layers.rotary import RotaryEmbedding, rope_inv_freq
        from epd.models.mllama.text_model import MllamaLM
        from epd.models.weights import load_into

        inv_freq, scaling = rope_inv_freq(self.hf.text_config)
        with torch.device("meta"):
            model = MllamaLM(self.text, torch.nn.Identity(), self.cross_layers)
        model = model.to_empty(device=device).to(dtype)
        model.rotary = RotaryEmbedding(inv_freq, scaling).to(device)
        load_into(model, ((n, t) for n, t in self.weights("") if not n.startswith("vision.")))
        return model.eval()

    def build_vision(self, device: torch.device | str, dtype: torch.dtype):
        from epd.models.mllama.vision import MllamaVisionEncoder

        return MllamaVisionEncoder(self.path, self.hf, device, dtype)

    def reference_vision(self, device: torch.device | str, dtype: torch.dtype):
        from epd.models.mllama.vision import TransformersVision

        return TransformersVision(self.path, device, dtype)

    def image_processor(self, on_device: bool = False):
        from epd.models.mllama.image_processor import MllamaImageProcessor

        if self._processor is None:
            self._processor = MllamaImageProcessor(self.path)
        return self._processor

    def weight_name(self, raw: str) -> str | None:
        return weight_name(raw)

    # ---- images ---------------------------------------------------------------------------------
    def check_layout(self, layout: ImageLayout) -> None:
        self.image_processor().check_layout(layout)

    def cross_rows(self, layout: ImageLayout) -> tuple[int, int]:
        return self.max_tiles * self.tile_rows, layout.dims[0] * self.tile_rows

    def cross_spans(self, ids: list[int], starts: list[int]) -> list[tuple[int, int]]:
        spans = [[s, e] for s, e in zip(starts, [*starts[1:], -1], strict=True)]
        reach = -1   # how far the image after a run of consecutive image tokens is seen
        for span in reversed(spans):
            if span[1] == span[0] + 1:
                span[1] = reach
            reach = span[1]
        return [(s, e) for s, e in spans]

    def precomputed_layout(self, item: dict[str, Any], embeddings: torch.Tensor, index: int,
                           ids: list[int] | None = None) -> ImageLayout:
        raise InputError(f"image {index}: precomputed embeddings are not supported for {self.model_id} "
                         "(a cross-attention model)", f"image_data[{index}]")
