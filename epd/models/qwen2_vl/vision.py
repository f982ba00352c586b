"""Vision tower glue: the checkpoint's own `transformers` vision module, loaded with our loader.

`VisionTower.encode(images)` runs a batch of preprocessed images (`encode_pixels`: patches of all
images concatenated, as the Qwen2-VL family expects) and returns one embedding tensor per image,
`[tokens_i, text_hidden]`, where tokens_i = t * h * w / merge**2.

The tower's per-forward metadata (rotary position ids, attention segment boundaries and their
maximum length, and Qwen2.5-VL's window order) depends on the image grids only. transformers
computes it from `grid_thw` inside the forward, on the tower's device, with host syncs (`tolist`,
`item`) and index tensors built on the CPU; here it is computed once per set of grids by
transformers' own helpers on the CPU, kept on the device, and handed in as the keyword arguments
those helpers take precomputed, so a forward on the GPU queues its kernels without waiting.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from epd.models.qwen2_vl.image_processor import PreprocessedImage, pixel_values
from epd.models.qwen2_vl.vision_blocks import fast_blocks_available, install_fast_blocks, longest_segment
from epd.models.weights import load_into


def vision_class(model_type: str):
    if model_type == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return Qwen2_5_VisionTransformerPretrainedModel


class VisionTower:
    def __init__(self, family: Any, device: torch.device | str, dtype: torch.dtype,
                 attention: str = "auto") -> None:
        """family: the checkpoint's `QwenVLFamily`. attention: "auto" = our GPU blocks
        (`vision_blocks`: fused kernels, varlen flash attention) where they run (GPU, bf16/fp16),
        else transformers' blocks with SDPA; "sdpa" = transformers' own blocks (the reference)."""
        cls = vision_class(family.model_type)
        vcfg = family.hf.vision_config
        vcfg._attn_implementation = "sdpa"
        from transformers.initialization import no_init_weights

        with no_init_weights(), torch.device(device):  # weights come from the checkpoint below
            module = cls._from_config(vcfg, dtype=dtype)
        load_into(module, family.weights("vision."), strip="vision.")
        self.module = module.eval()
        self.device = torch.device(device)
        self.fast_blocks = attention == "auto" and fast_blocks_available(self.device, dtype)
        if self.fast_blocks:
            install_fast_blocks(self.module)
        self.dtype = dtype
        self.merge = family.merge
        self.windowed = family.model_type != "qwen2_vl"      # Qwen2.5-VL's window attention
        self._metadata: OrderedDict[tuple, dict[str, Any]] = OrderedDict()

    def encode(self, images: list[PreprocessedImage]) -> list[torch.Tensor]:
        """Preprocessed images -> per-image embeddings [tokens_i, text_hidden], one forward."""
        return self.encode_pixels(pixel_values(images, self.device), torch.tensor([im.grid_thw for im in images]))

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values: [num_patches, C*T*P*P], grid_thw: [num_images, 3] -> per-image embeddings."""
        out = self.module(pixel_values.to(self.device, self.dtype), grid_thw=grid_thw.to(self.device),
                          **self.metadata(grid_thw))
        merged = out.pooler_output  # [sum tokens_i, text_hidden]
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        return list(torch.split(merged, sizes))

    def metadata(self, grid_thw: torch.Tensor, keep: int = 64) -> dict[str, Any]:
        """Keyword arguments with the forward's grid-derived metadata, on the tower's device
        (the last `keep` grid sets are cached)."""
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

        key = tuple(tuple(g) for g in grid_thw.tolist())
        meta = self._metadata.get(key)
        if meta is None:
            grid = grid_thw.cpu()
            cu = get_vision_cu_seqlens(grid)
            meta = {"position_ids": get_vision_position_ids(grid, self.merge), "cu_seqlens": cu,
                    "max_seqlen": longest_segment(cu)}
            if self.windowed:
                cfg = self.module.config
                index, cu_win = get_vision_window_index(grid, spatial_merge_size=self.merge,
                                                        window_size=cfg.window_size, patch_size=cfg.patch_size)
                meta.update(window_index=index, cu_window_seqlens=cu_win,
                            max_window_seqlen=longest_segment(cu_win))
            meta = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in meta.items()}
            self._metadata[key] = meta
            if len(self._metadata) > keep:
                self._metadata.popitem(last=False)
        self._metadata.move_to_end(key)
        return dict(meta)   # the forward pops them
