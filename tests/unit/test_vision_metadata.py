"""The vision tower's forward with its grid metadata handed in (computed once per set of grids on
the CPU) gives exactly what transformers' forward gives when it derives that metadata itself."""

from __future__ import annotations

import pytest
import torch

from epd.config import ModelConfig
from epd.models.qwen2_vl.vision import VisionTower


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_encode_with_precomputed_metadata_equals_transformers(tiny_models, arch):
    cfg = ModelConfig.from_pretrained(tiny_models[arch])
    tower = VisionTower(cfg.family, "cpu", torch.float32)
    vc = cfg.family.hf.vision_config
    grid = torch.tensor([[1, 20, 36], [1, 8, 12], [1, 20, 36]])    # windows of several sizes; a repeat
    pixels = torch.randn(int(grid.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
                         generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = torch.split(tower.module(pixels, grid_thw=grid).pooler_output, (grid.prod(-1) // 4).tolist())
    for _ in range(2):                                               # computed, then from the cache
        got = tower.encode_pixels(pixels, grid)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert len(tower._metadata) == 1
