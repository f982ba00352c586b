"""Every family on the GPU: the tiny checkpoints' float32 greedy output equals transformers' on the
GPU token for token; the 7b presets' bf16 prefill logits (flashinfer, fused kernels) are within
cosine 0.999 of transformers' bf16 forward at every position, and their vision encoders' output
within cosine 0.999 of transformers' `get_image_features`. A 7b checkpoint comes from
$EPD_GPU_MODEL_<ARCH> (e.g. EPD_GPU_MODEL_LLAVA=/tmp/mllava7b) when set, else it is written here."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_steps_close, cosine_rows, forced_logits, hf_generate_on, hf_inputs, hf_model_on
from support import ARCHS, IMAGE, LLAVA_BACKBONES, family_prompt, noise_image

from epd import Engine
from epd.engine.attention.flashinfer_backend import FlashInferBackend
from epd.engine.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = {"temperature": 0, "max_new_tokens": 12}
CASES = [(("Hello, tell me a story about a red cat.",), []), ((IMAGE, "Describe this picture."), [(120, 80)]),
         (("First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(300, 90), (50, 50)])]
LARGE = {"llava": "7b", "llava_next": "7b", "llava_onevision": "7b", "mllama": "11b"}   # arch -> preset


def _images(sizes):
    return [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("arch", ARCHS + LLAVA_BACKBONES + ("mllama", "llama4"))
def test_fp32_greedy_equals_transformers_on_gpu(tiny_models, arch):
    path = tiny_models[arch]
    with Engine(model_path=path, dtype="float32", page_size=4, max_step_tokens=48, kv_cache_tokens=32768) as llm:
        for parts, sizes in CASES:
            images, prompt = _images(sizes), family_prompt(llm.tokenizer, *parts)
            out = llm.generate(prompt=prompt, image_data=images or None, sampling_params=GREEDY)
            ids = llm.core.inputs.process(prompt=prompt, image_data=images).input_ids
            assert out["output_ids"] == hf_generate_on(path, ids, images, GREEDY["max_new_tokens"])
        llm.check_integrity()


def _checkpoint_large(arch: str, tmp_path_factory) -> str:
    path = os.environ.get(f"EPD_GPU_MODEL_{arch.upper()}")
    if path and os.path.isdir(path):
        return path
    from epd.models.tiny_model import write_tiny_model

    preset = LARGE[arch]
    return write_tiny_model(arch, str(tmp_path_factory.mktemp(f"{arch}{preset}")), preset, device="cuda")


@pytest.mark.parametrize("arch", list(LARGE))
def test_large_bf16_prefill_logits_and_vision_match_transformers(arch, tmp_path_factory):
    """(Llama-3.2-Vision's 11b: its pool is one buffer of strided layer views, which flashinfer reads.)"""
    path = _checkpoint_large(arch, tmp_path_factory)
    images = [noise_image(448, 336, seed=3)]
    with Engine(model_path=path, kv_cache_tokens=8192, max_step_tokens=8192, disable_prefix_caching=True,
                disable_cuda_graph=True) as llm:
        core = llm.core
        assert core.dtype == torch.bfloat16 and isinstance(core.runner.backend, FlashInferBackend)
        inp = core.inputs.process(prompt=family_prompt(llm.tokenizer, IMAGE, "What is in this image?"),
                                  image_data=images)
        req = core.new_request(inp, SamplingParams(max_new_tokens=1))
        core.add(req)
        chunks = core.scheduler.schedule()
        assert len(chunks) == 1 and chunks[0].length == len(inp.input_ids), "one prefill chunk"
        core._encode_images([req])
        runner = core.runner
        with torch.inference_mode():
            input_ids, positions, meta = runner.step_inputs(chunks)
            runner.backend.plan(meta)
            cross = runner.cross_step(chunks)   # image rows (cross-attention families), written by _encode_images
            hidden = runner.model(runner.embed(chunks, input_ids), positions, runner.backend, core.kv.layers,
                                  **({"cross": cross} if cross is not None else {}))
            ours = runner.model.logits(hidden)
        core.abort(req.rid)
        pre = core.inputs.image_processor.preprocess_many(images)
        ours_vision = core.vision.encode(pre)
        ref = core.model_config.family.reference_vision(core.device, core.dtype)
        for a, b in zip(ours_vision, ref.encode(pre), strict=True):
            assert a.shape == b.shape and (cosine_rows(a.float(), b.float()) > 0.999).all()
        del ref
    torch.cuda.empty_cache()
    with torch.inference_mode():
        hf = hf_model_on(path, "cuda", torch.bfloat16)
        theirs = hf(**hf_inputs(path, inp.input_ids, images, hf, "cuda")).logits[0].float()
    hf_model_on.cache_clear()
    cos = cosine_rows(ours, theirs)
    assert cos.numel() == len(inp.input_ids) and (cos >= 0.999).all(), f"min cosine {cos.min():.5f}"


@pytest.fixture(scope="module")
def mllama128(tmp_path_factory) -> str:
    from helpers import small128_checkpoint

    return small128_checkpoint(str(tmp_path_factory.mktemp("mllama128")), "mllama")


def _mllama_forced(path: str, **engine_kwargs):
    llm = Engine(model_path=path, dtype="bfloat16", page_size=4, max_step_tokens=64, kv_cache_tokens=32768,
                 **engine_kwargs)
    prompt = lambda *parts: family_prompt(llm.tokenizer, *parts)   # noqa: E731
    cases = [(prompt("Tell me a story about a red cat, " * 3), []),
             (prompt(IMAGE, "Describe this picture."), [(120, 80)]),
             (prompt("First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(300, 90), (50, 50)]),
             (prompt(IMAGE, IMAGE, "Both at once:"), [(64, 200), (90, 90)])]
    inputs = [llm.core.inputs.process(prompt=p, image_data=_images(s)) for p, s in cases]
    gen = torch.Generator().manual_seed(0)
    forced = [torch.randint(0, 1000, (8 + 3 * i,), generator=gen).tolist() for i in range(len(inputs))]
    return forced_logits(llm.core, inputs, forced), llm


@pytest.mark.parametrize("graph_decode", ["split_kv", "flashinfer"])
def test_cross_attention_graph_decode_matches_the_torch_path(mllama128, graph_decode, monkeypatch):
    """Llama-3.2-Vision's decode in CUDA graphs (the self-attention layers through split-KV or
    flashinfer's decode over the buffer's strided views, the cross decode kernel over the image
    rows: two images read as two row ranges, a text-only request in the same batch) gives the torch
    backend's eager logits at every step."""
    from epd.engine.attention import flashinfer_backend

    ref, ref_llm = _mllama_forced(mllama128, attention_backend="torch")
    ref_llm.shutdown()
    monkeypatch.setattr(flashinfer_backend, "GRAPH_DECODE", graph_decode)
    got, llm = _mllama_forced(mllama128)
    assert isinstance(llm.core.runner.backend, FlashInferBackend) and llm.core.runner.graphs is not None
    assert llm.core.runner.graphs.replays > 5, "pure-decode steps should replay graphs"
    assert_steps_close(got, ref)
    llm.check_integrity()
    llm.shutdown()


def test_llama4_graph_decode_matches_the_torch_path(tiny_models):
    """Llama 4 in bf16 on the GPU: decode steps replay CUDA graphs (split-KV attention, its chunked
    layers reading only the token's own chunk of 8; the routed experts as Triton grouped GEMMs)
    and give the eager torch path's logits at every step, across chunk boundaries."""
    path = tiny_models["llama4"]

    def forced(**engine_kwargs):
        llm = Engine(model_path=path, dtype="bfloat16", page_size=4, max_step_tokens=64, kv_cache_tokens=32768,
                     **engine_kwargs)
        prompt = lambda *parts: family_prompt(llm.tokenizer, *parts)   # noqa: E731
        inputs = [llm.core.inputs.process(prompt=prompt("Tell me a story about a red cat, " * (i + 1)))
                  for i in range(3)]
        inputs.append(llm.core.inputs.process(prompt=prompt(IMAGE, "Describe this picture."),
                                              image_data=_images([(120, 80)])))
        gen = torch.Generator().manual_seed(1)
        return forced_logits(llm.core, inputs, [torch.randint(0, 900, (13,), generator=gen).tolist()
                                                for _ in inputs]), llm

    ref, ref_llm = forced(disable_cuda_graph=True)
    ref_llm.shutdown()
    got, llm = forced()
    assert llm.core.runner.graphs is not None and llm.core.runner.graphs.replays > 5
    assert_steps_close(got, ref)
    llm.check_integrity()
    llm.shutdown()
