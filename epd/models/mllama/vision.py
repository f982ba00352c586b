"""The Llama-3.2-Vision vision side: the tiled ViT and the projector, giving the text model's
cross-attention states.

Per image (always `max_num_tiles` tiles, its padding tiles included: real tiles attend to them):
patches of each tile (conv) + tanh-gated pre-tile embedding, a class token per tile, gated
position embeddings, LayerNorm, each tile padded to a multiple of 8 positions; then the local
encoder over all tiles' tokens at once, LayerNorm, the post-tile embedding, the global encoder
(gated layers). The output per position is the global encoder's output followed by the local
encoder's outputs at `intermediate_layers_indices`, interleaved feature by feature (feature d of
layer k at d * K + k, transformers' stack-then-flatten order), the filler positions dropped:
[T, P, D * (1 + K)] (7680 wide on the 11B). `multi_modal_projector` (Linear with bias) maps that
to the text width.

`MllamaVisionEncoder.encode(images)` runs the images of a list in one forward and returns per
image its cross-attention states [max_num_tiles * P, text_hidden] (tile-major, then position; P =
(image_size / patch_size)^2 + 1, 1601 at 560 px). A request's states are its images' in prompt
order, concatenated: transformers' `cross_attention_states` of a batch of one, flattened.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from epd.models.mllama.image_processor import MllamaPixels, tile_batch
from epd.models.mllama.names import weight_name
from epd.models.mllama.vision_layers import Encoder, GatedPositionEmbedding, TileEmbedding, tile_attention_mask
from epd.models.weights import iter_weights, load_into


class VisionTower(nn.Module):
    """transformers' `MllamaVisionModel` (the checkpoint's `vision_model.*`)."""

    def __init__(self, vc: Any) -> None:
        super().__init__()
        hidden, tiles, ratios = vc.hidden_size, vc.max_num_tiles, len(vc.supported_aspect_ratios)
        self.hidden, self.max_tiles = hidden, tiles
        self.positions = (vc.image_size // vc.patch_size) ** 2 + 1     # patches + the class token
        self.intermediate_layers = tuple(vc.intermediate_layers_indices)
        self.patch_embedding = nn.Conv2d(vc.num_channels, hidden, vc.patch_size, stride=vc.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(hidden))
        self.gated_positional_embedding = GatedPositionEmbedding(ratios, tiles, self.positions, hidden)
        self.pre_tile_positional_embedding = TileEmbedding(ratios, tiles, hidden)
        self.post_tile_positional_embedding = TileEmbedding(ratios, tiles, hidden)
        self.layernorm_pre = nn.LayerNorm(hidden)
        self.layernorm_post = nn.LayerNorm(hidden)
        layer = dict(hidden=hidden, num_heads=vc.attention_heads, intermediate=vc.intermediate_size,
                     eps=vc.norm_eps, act=vc.hidden_act)
        self.transformer = Encoder(vc.num_hidden_layers, gated=False, **layer)
        self.global_transformer = Encoder(vc.num_global_layers, gated=True, **layer)

    def embed(self, pixels: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, C, S, S] -> the encoder's input [B, T, P, D]."""
        batch, tiles = pixels.shape[:2]
        patches = self.patch_embedding(pixels.flatten(0, 1))                  # [B*T, D, S/p, S/p]
        x = patches.flatten(2).transpose(1, 2).reshape(batch, tiles, -1, self.hidden)
        x = self.pre_tile_positional_embedding(x, ratio_ids)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(batch, tiles, 1, self.hidden), x], dim=2)
        x = self.gated_positional_embedding(x, ratio_ids)
        return self.layernorm_pre(x)

    def forward(self, pixels: torch.Tensor, ratio_ids: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, C, S, S], ratio_ids [B], tile_mask [B, T] -> [B, T, P, D * (1 + K)]."""
        batch, tiles = pixels.shape[:2]
        positions, hidden = self.positions, self.hidden
        padded = positions + (-positions) % 8
        x = F.pad(self.embed(pixels, ratio_ids), (0, 0, 0, padded - positions))   # [B, T, P8, D]
        allowed = tile_attention_mask(tile_mask, positions, padded)
        x, kept = self.transformer(x.reshape(batch, tiles * padded, hidden), allowed, self.intermediate_layers)
        x = self.layernorm_post(x).view(batch, tiles, padded, hidden)
        x = self.post_tile_positional_embedding(x, ratio_ids)
        x, _ = self.global_transformer(x.reshape(batch, tiles * padded, hidden), allowed)
        # feature d of kept layer k at d * K + k
        intermediate = torch.stack(kept, dim=-1).view(batch, tiles, padded, hidden * len(kept))
        out = torch.cat([x.view(batch, tiles, padded, hidden), intermediate], dim=-1)
        return out[:, :, :positions]


class MllamaVision(nn.Module):
    """The tower and the projector, named as in the checkpoint."""

    def __init__(self, hf: Any) -> None:
        super().__init__()
        self.vision_model = VisionTower(hf.vision_config)
        self.multi_modal_projector = nn.Linear(hf.vision_config.vision_output_dim, hf.text_config.hidden_size)

    def forward(self, pixels: torch.Tensor, ratio_ids: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """-> cross-attention states [B, T * P, text_hidden]."""
        states = self.multi_modal_projector(self.vision_model(pixels, ratio_ids, tile_mask))
        return states.flatten(1, 2)


def vision_weights(path: str):
    """(our name, tensor) of the checkpoint's vision tower and projector."""
    for raw, read in iter_weights(path):
        name = weight_name(raw)
        if name is not None and name.startswith("vision."):
            yield name, read()


class MllamaVisionEncoder:
    def __init__(self, path: str, hf: Any, device: torch.device | str, dtype: torch.dtype) -> None:
        """path: the checkpoint directory; hf: its transformers `MllamaConfig`."""
        self.device, self.dtype = torch.device(device), dtype
        with torch.device("meta"):           # every parameter comes from the checkpoint below
            module = MllamaVision(hf)
        module = module.to_empty(device=self.device).to(dtype)
        load_into(module, vision_weights(path), strip="vision.")
        self.module = module.eval()
        tower = module.vision_model
        self.tokens_per_image = tower.max_tiles * tower.positions

    @torch.inference_mode()
    def encode(self, images: list[MllamaPixels]) -> list[torch.Tensor]:
        """One forward over the images -> per image [max_num_tiles * P, text_hidden]."""
        if not images:
            return []
        batch = tile_batch(images, self.device)
        states = self.module(batch.pixel_values.to(self.dtype), batch.aspect_ratio_ids, batch.aspect_ratio_mask)
        return list(states.unbind(0))


class TransformersVision:
    """transformers' own vision model + projector (its model loaded whole, the text model then freed):
    what GPU tests compare `MllamaVisionEncoder` against."""

    def __init__(self, path: str, device: torch.device | str, dtype: torch.dtype) -> None:
        from transformers import MllamaForConditionalGeneration

        model = MllamaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        del model.model.language_model, model.lm_head
        self.model = model.model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype

    @torch.inference_mode()
    def encode(self, images: list[MllamaPixels]) -> list[torch.Tensor]:
        batch = tile_batch(images, self.device)
        out = self.model.vision_model(pixel_values=batch.pixel_values[:, None].to(self.dtype),
                                      aspect_ratio_ids=batch.aspect_ratio_ids[:, None],
                                      aspect_ratio_mask=batch.aspect_ratio_mask[:, None])
        states = self.model.multi_modal_projector(out.last_hidden_state)   # [B, 1, T, P, hidden]
        return list(states.flatten(1, 3).unbind(0))
