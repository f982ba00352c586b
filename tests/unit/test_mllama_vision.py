"""Llama-3.2-Vision's vision tower + projector against transformers on a random tiny checkpoint:
the cross-attention states our encoder returns are, concatenated in prompt order, the tensor
transformers' `MllamaForConditionalGeneration` hands its language model (caught at the language
model's call), for one image and for a request of two images with different tile counts; bf16
runs and stays near float32; the 11b preset's config has the published dims."""

from __future__ import annotations

import pytest
import torch
from support import noise_image

from epd.models.mllama.image_processor import MllamaImageProcessor
from epd.models.mllama.tiny import write_tiny
from epd.models.mllama.vision import MllamaVision, MllamaVisionEncoder


@pytest.fixture(scope="module")
def checkpoint(tiny_models) -> str:
    return tiny_models["mllama"]   # the session's tiny checkpoint (epd tiny-model mllama)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _hf_cross_attention_states(checkpoint: str, model, images) -> torch.Tensor:
    """What transformers' model passes its language model as `cross_attention_states` for a
    prompt of `images` (transformers' own processor's inputs): [images * tiles, P, text hidden]."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    inputs = MllamaImageProcessorPil.from_pretrained(checkpoint)(images=[images], return_tensors="pt")
    image_token = model.config.image_token_id
    ids = torch.tensor([[image_token] * len(images) + [5, 6, 7]])
    caught = {}

    def catch(_module, _args, kwargs):
        caught["states"] = kwargs["cross_attention_states"]

    handle = model.model.language_model.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                  aspect_ratio_mask=inputs["aspect_ratio_mask"])
    finally:
        handle.remove()
    return caught["states"]


def _assert_states_equal(ours: list[torch.Tensor], theirs: torch.Tensor) -> None:
    flat = theirs.reshape(-1, theirs.shape[-1])
    assert torch.cat(ours).shape == flat.shape
    torch.testing.assert_close(torch.cat(ours), flat, atol=1e-5 * flat.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("sizes", [[(120, 40)], [(300, 90), (40, 40)], [(30, 200), (70, 60), (56, 56)]],
                         ids=["one", "two-of-4-and-1-tiles", "three"])
def test_cross_attention_states_equal_transformers(checkpoint, hf_model, sizes):
    images = [noise_image(w, h, seed=w * h) for w, h in sizes]
    processor = MllamaImageProcessor(checkpoint)
    encoder = MllamaVisionEncoder(checkpoint, hf_model.config, "cpu", torch.float32)
    ours = encoder.encode(processor.preprocess_many(images))
    tiles, positions = 4, (56 // 14) ** 2 + 1
    assert [tuple(s.shape) for s in ours] == [(tiles * positions, 64)] * len(images)
    assert encoder.tokens_per_image == tiles * positions
    _assert_states_equal(ours, _hf_cross_attention_states(checkpoint, hf_model, images))


def test_an_image_alone_and_in_a_batch_encode_alike(checkpoint, hf_model):
    """Images of one forward do not see each other (the batch axis is the image)."""
    processor = MllamaImageProcessor(checkpoint)
    encoder = MllamaVisionEncoder(checkpoint, hf_model.config, "cpu", torch.float32)
    a, b = processor.preprocess_many([noise_image(90, 30, seed=1), noise_image(20, 90, seed=2)])
    alone, together = encoder.encode([b])[0], encoder.encode([a, b])[1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_bf16_runs_near_float32(checkpoint, hf_model):
    processor = MllamaImageProcessor(checkpoint)
    pixels = processor.preprocess_many([noise_image(100, 70, seed=3)])
    full = MllamaVisionEncoder(checkpoint, hf_model.config, "cpu", torch.float32).encode(pixels)[0]
    half = MllamaVisionEncoder(checkpoint, hf_model.config, "cpu", torch.bfloat16).encode(pixels)[0]
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).norm() / full.norm() < 0.05


def test_11b_preset_has_the_published_dims(tmp_path):
    from transformers import AutoConfig

    write_tiny("mllama", str(tmp_path), "11b", weights=False)
    hf = AutoConfig.from_pretrained(str(tmp_path))
    tc, vc = hf.text_config, hf.vision_config
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size, tc.vocab_size) == (40, 4096, 32, 8, 14336, 128256)
    assert tc.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    assert tc.rope_parameters["rope_type"] == "llama3" and tc.rope_parameters["rope_theta"] == 500000.0
    assert (vc.num_hidden_layers, vc.num_global_layers, vc.hidden_size, vc.attention_heads, vc.image_size,
            vc.patch_size, vc.max_num_tiles, vc.vision_output_dim) == (32, 8, 1280, 16, 560, 14, 4, 7680)
    assert vc.intermediate_layers_indices == [3, 7, 15, 23, 30] and hf.image_token_id == 128256
    with torch.device("meta"):
        vision = MllamaVision(hf)
    assert vision.multi_modal_projector.in_features == 7680
    assert vision.vision_model.positions == 1601
    assert MllamaImageProcessor(str(tmp_path)).layout(noise_image(1920, 1080)).dims == (4, 6, 2, 2)


def test_checkpoint_names_map_onto_our_modules(hf_model):
    """Every tensor of transformers' model, named as on the Hub or as transformers 5 saves it,
    finds its module: the vision ones exactly cover `MllamaVision`'s parameters."""
    from epd.models.mllama.names import hub_name, weight_name

    names = list(hf_model.state_dict())
    assert all(weight_name(hub_name(n)) == weight_name(n) is not None for n in names)
    vision = {weight_name(n)[len("vision."):] for n in names if weight_name(n).startswith("vision.")}
    with torch.device("meta"):
        ours = MllamaVision(hf_model.config)
    assert vision == {n for n, _ in ours.named_parameters()}
    assert weight_name("language_model.model.layers.3.cross_attn.q_proj.weight") == \
        "language_model.layers.3.cross_attn.q_proj.weight"
