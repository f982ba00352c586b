"""The LLaVA vision side: the checkpoint's CLIP / SigLIP tower, the MLP projector, anyres packing.

`LlavaVision` (an nn.Module whose parameter names are the checkpoint's under `vision.`) runs a
batch of crops through the tower, takes the hidden states of `vision_feature_layer` (several
layers: concatenated), drops the CLS token under the "default" strategy, and projects each token
to the text model's width. Layers after the last one read are taken out after loading (their
output is never used). `VisionEncoder.encode` runs every crop of every image in one forward and
returns each image's embeddings in prompt order (LLaVA-NeXT / OneVision: `anyres.Anyres.pack`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from epd.models.llava.image_processor import LlavaPixels
from epd.models.weights import load_into


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _layers(tower: nn.Module) -> nn.ModuleList:
    return tower.encoder.layers


class LlavaVision(nn.Module):
    def __init__(self, family: Any) -> None:
        super().__init__()
        from transformers import AutoModel

        hf = family.hf
        hf.vision_config._attn_implementation = "sdpa"
        self.vision_tower = AutoModel.from_config(hf.vision_config)
        layer = hf.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        width = hf.vision_config.hidden_size * len(self.feature_layers)
        self.multi_modal_projector = Projector(width, family.text.hidden_size, hf.projector_hidden_act,
                                               getattr(hf, "multimodal_projector_bias", True))
        self.drop_cls = hf.vision_feature_select_strategy == "default"
        if family.anyres is not None:
            self.image_newline = nn.Parameter(torch.empty(family.text.hidden_size))

    def keep_needed_layers(self) -> None:
        """Take out the tower's layers after the last feature layer; feature layers become absolute
        indices into the hidden states (0 = the embeddings)."""
        total = len(_layers(self.vision_tower))
        self.feature_layers = [i if i >= 0 else total + 1 + i for i in self.feature_layers]
        del _layers(self.vision_tower)[max(self.feature_layers):]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, S, S] -> projected features [N, tokens per crop, text hidden]."""
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = torch.cat([out.hidden_states[i] for i in self.feature_layers], dim=-1)
        if self.drop_cls:
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)


class VisionEncoder:
    def __init__(self, family: Any, device: torch.device | str, dtype: torch.dtype) -> None:
        from transformers.initialization import no_init_weights

        self.family = family
        self.device = torch.device(device)
        self.dtype = dtype
        with no_init_weights(), torch.device(self.device):   # weights come from the checkpoint below
            module = LlavaVision(family).to(dtype)
        load_into(module, family.weights("vision."), strip="vision.")
        module.keep_needed_layers()
        self.module = module.eval()

    @torch.inference_mode()
    def encode(self, images: list[LlavaPixels]) -> list[torch.Tensor]:
        """One forward over every crop of every image -> per image [layout.num_tokens, text hidden]."""
        pixels = torch.cat([im.pixel_values for im in images]).to(self.device, self.dtype, non_blocking=True)
        feats = self.module(pixels)
        out, start = [], 0
        anyres = self.family.anyres
        for im in images:
            crops = feats[start:start + im.num_crops]
            start += im.num_crops
            if anyres is None:
                emb = crops[0]
            elif self.family.base_only(im.layout):   # one view of several images: its tokens and a newline
                emb = torch.cat((crops[0], self.module.image_newline[None].to(crops.dtype)))
            else:
                emb = anyres.pack(crops, *im.size, self.module.image_newline)
            if emb.shape[0] != im.layout.num_tokens:
                raise RuntimeError(f"image of {emb.shape[0]} embeddings, {im.layout.num_tokens} tokens expected")
            out.append(emb)
        return out


class TransformersVision:
    """transformers' own `get_image_features` (its model loaded whole, the text model then freed)."""

    def __init__(self, family: Any, device: torch.device | str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(family.path, dtype=dtype)
        del model.model.language_model, model.lm_head
        self.model = model.model.to(device).eval()
        self.device, self.dtype, self.anyres = torch.device(device), dtype, family.anyres is not None

    @torch.inference_mode()
    def encode(self, images: list[LlavaPixels]) -> list[torch.Tensor]:
        pixels = torch.cat([im.pixel_values for im in images]).to(self.device, self.dtype)
        kwargs = {"image_sizes": torch.tensor([im.size for im in images], device=self.device)} if self.anyres else {}
        return list(self.model.get_image_features(pixel_values=pixels, **kwargs).pooler_output)
