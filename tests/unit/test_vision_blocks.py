"""The GPU vision blocks compute what transformers' blocks compute: checked here through their
torch paths on the CPU in float32, with a deliberately misaligned MLP size so that the zero
padding is exercised (the GPU test compares the bf16 kernels against transformers' tower)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from epd.config import ModelConfig
from epd.models.qwen2_vl.vision import vision_class
from epd.models.qwen2_vl.vision_blocks import FastVisionBlock, PaddedGatedMLP, install_fast_blocks


def _tower(path: str, inter: int | None) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig.from_pretrained(path)
    vc = copy.deepcopy(cfg.family.hf.vision_config)   # the checkpoint's config is shared in the process
    if inter is not None:                       # a size that is not a multiple of 8, like 3,420
        vc.intermediate_size = inter
    torch.manual_seed(0)
    module = vision_class(cfg.model_type)._from_config(vc, dtype=torch.float32).eval()
    for name, p in module.named_parameters():  # every block's parts matter to the output
        torch.nn.init.normal_(p, std=0.05 if name.startswith("patch_embed") else 0.2)
    return module, cfg


@pytest.mark.parametrize("arch,inter", [("qwen2_5_vl", 60), ("qwen2_vl", None)])
def test_fast_blocks_give_transformers_tower_output(tiny_models, arch, inter):
    ref, cfg = _tower(tiny_models[arch], inter)
    fast = copy.deepcopy(ref)
    assert install_fast_blocks(fast) == len(ref.blocks)
    assert all(isinstance(b, FastVisionBlock) for b in fast.blocks)
    if arch == "qwen2_5_vl":
        assert all(isinstance(b.mlp, PaddedGatedMLP) for b in fast.blocks)
        assert fast.blocks[0].mlp.down_weight.shape[1] == 64
    vc = ref.config
    grid = torch.tensor([[1, 20, 36], [1, 8, 12]])                   # windows of several sizes
    pixels = torch.randn(int(grid.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
                         generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref(pixels, grid_thw=grid).pooler_output
        got = fast(pixels, grid_thw=grid).pooler_output
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.equal(want, torch.zeros_like(want))


def test_padded_mlp_equals_the_unpadded_one():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    class Cfg:
        hidden_size, intermediate_size, hidden_act = 32, 60, "silu"

    mlp = Qwen2_5_VLMLP(Cfg(), bias=True).eval()
    padded = PaddedGatedMLP(mlp)
    assert padded.gate_up_weight.shape == (128, 32) and padded.down_weight.shape == (32, 64)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(padded(x), mlp(x), rtol=1e-5, atol=1e-6)
        gate_up = F.linear(x, padded.gate_up_weight, padded.gate_up_bias)
    assert torch.equal(gate_up[:, 60:64], torch.zeros(5, 4)) and torch.equal(gate_up[:, 124:], torch.zeros(5, 4))
