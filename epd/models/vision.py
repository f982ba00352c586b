"""Vision tower glue: the checkpoint's own `transformers` vision module, loaded with our loader.

`VisionTower.encode(pixel_values, grid_thw)` runs a batch of images (patches of all images
concatenated, as the Qwen2-VL family expects) and returns one embedding tensor per image,
`[tokens_i, text_hidden]`, where tokens_i = t * h * w / merge**2.
"""

from __future__ import annotations

import torch

from epd.config import ModelConfig
from epd.models.vision_attention import enable_varlen_attention
from epd.weights import iter_weights, load_into


def _vision_class(arch: str):
    if arch == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return Qwen2_5_VisionTransformerPretrainedModel


class VisionTower:
    def __init__(self, config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 attention: str = "auto") -> None:
        """attention: "auto" = varlen flash attention where it runs (GPU, bf16/fp16), else SDPA;
        "sdpa" = transformers' own path (the reference)."""
        cls = _vision_class(config.arch)
        vcfg = config.hf_config.vision_config
        vcfg._attn_implementation = "sdpa"
        from transformers.initialization import no_init_weights

        with no_init_weights(), torch.device(device):  # weights come from the checkpoint below
            module = cls._from_config(vcfg, dtype=dtype)
        load_into(module, iter_weights(config.model_path, "visual."), strip="visual.")
        self.module = module.eval()
        self.device = torch.device(device)
        if attention == "auto":
            enable_varlen_attention(self.module, self.device, dtype)
        self.dtype = dtype
        self.merge = config.spatial_merge_size

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values: [num_patches, C*T*P*P], grid_thw: [num_images, 3] -> per-image embeddings."""
        out = self.module(pixel_values.to(self.device, self.dtype), grid_thw=grid_thw.to(self.device))
        merged = out.pooler_output  # [sum tokens_i, text_hidden]
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        return list(torch.split(merged, sizes))

