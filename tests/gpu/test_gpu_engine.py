"""The engine on a GPU: float32 greedy equals transformers on the GPU (torch attention, since
flashinfer has no float32 kernels); in bf16 the flashinfer backend, with and without CUDA graphs,
gives the torch backend's logits at every step (forced tokens, chunked prefill, mixed steps,
padded graph buckets); the 3B preset's prefill logits match transformers' bf16 forward."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_steps_close, cosine_rows, forced_logits, hf_generate_on, hf_inputs, hf_model_on
from support import IMAGE, chat_prompt, noise_image

from epd import Engine
from epd.engine.attention.flashinfer_backend import FlashInferBackend
from epd.engine.attention.torch_backend import TorchAttentionBackend
from epd.engine.engine_core import EngineConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = {"temperature": 0, "max_new_tokens": 12}
KV = 32768  # KV tokens per test engine, so that engines alive together do not each take 85% of the GPU
CASES = {
    "text_only": (chat_prompt("Hello, tell me a story about a red cat."), []),
    "one_image": (chat_prompt(IMAGE, "Describe this picture."), [(120, 80)]),
    "two_images": (chat_prompt("First:", IMAGE, " and second:", IMAGE, " which is bluer?"), [(90, 90), (140, 56)]),
}


def _images(sizes):
    return [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def test_cuda_is_the_default_device(tiny_models):
    assert EngineConfig(model_path=tiny_models["qwen2_vl"]).resolved_device().type == "cuda"


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_fp32_greedy_equals_transformers_on_gpu(tiny_models, arch):
    path = tiny_models[arch]
    with Engine(model_path=path, dtype="float32", page_size=4, max_step_tokens=48, kv_cache_tokens=KV) as llm:
        assert llm.core.device.type == "cuda"
        assert isinstance(llm.core.runner.backend, TorchAttentionBackend)  # no fp32 flashinfer kernels
        prompts, images = zip(*[(p, _images(s)) for p, s in CASES.values()], strict=True)
        for prompt, ims in zip(prompts, images, strict=True):
            out = llm.generate(prompt=prompt, image_data=ims or None, sampling_params=GREEDY)
            ids = llm.core.inputs.process(prompt=prompt, image_data=ims).input_ids
            assert out["output_ids"] == hf_generate_on(path, ids, ims, GREEDY["max_new_tokens"])
        batched = llm.generate(prompt=list(prompts), image_data=list(images), sampling_params=GREEDY)
        for prompt, ims, out in zip(prompts, images, batched, strict=True):
            ids = llm.core.inputs.process(prompt=prompt, image_data=ims).input_ids
            assert out["output_ids"] == hf_generate_on(path, ids, ims, GREEDY["max_new_tokens"])
        llm.check_integrity()


def _forced_run(path: str, **engine_kwargs) -> tuple[list[torch.Tensor], Engine]:
    llm = Engine(model_path=path, dtype="bfloat16", page_size=4, max_step_tokens=64, kv_cache_tokens=KV,
                 **engine_kwargs)
    gen = torch.Generator().manual_seed(0)
    inputs = [llm.core.inputs.process(prompt=chat_prompt(f"Prompt {i}: " + "tell me more " * (3 * i + 1)))
              for i in range(4)]
    inputs.append(llm.core.inputs.process(prompt=chat_prompt(IMAGE, "Describe."), image_data=_images([(120, 80)])))
    forced = [torch.randint(0, 1000, (6 + 3 * i,), generator=gen).tolist() for i in range(5)]
    return forced_logits(llm.core, inputs, forced), llm


def test_bf16_flashinfer_with_and_without_graphs_matches_torch_backend(small128):
    ref, ref_llm = _forced_run(small128, attention_backend="torch")
    ref_llm.shutdown()
    for graphs in (True, False):
        got, llm = _forced_run(small128, attention_backend="flashinfer", disable_cuda_graph=not graphs)
        assert isinstance(llm.core.runner.backend, FlashInferBackend)
        assert (llm.core.runner.graphs is not None) == graphs
        if graphs:
            assert llm.core.runner.graphs.replays > 5, "pure-decode steps should replay graphs"
        assert_steps_close(got, ref, f" (graphs={graphs})")
        llm.check_integrity()
        assert llm.core.kv.pool.num_in_use == 0
        llm.shutdown()


def test_bf16_flashinfer_generate_is_deterministic_and_frees_pages(small128):
    prompts = [chat_prompt(f"Story {i}: " + "and then " * i) for i in range(10)]
    # prefix caching off: the second run must compute what the first did (cache hits: next test)
    with Engine(model_path=small128, dtype="bfloat16", page_size=16, kv_cache_tokens=KV,
                disable_prefix_caching=True) as llm:
        a = [o["output_ids"] for o in llm.generate(prompt=prompts, sampling_params=GREEDY)]
        b = [o["output_ids"] for o in llm.generate(prompt=prompts, sampling_params=GREEDY)]
        sampled = llm.generate(prompt=prompts, sampling_params={"temperature": 0.8, "top_p": 0.9,   # may draw EOS
                                                                "max_new_tokens": 12, "ignore_eos": True})
        assert a == b and all(len(x) == 12 for x in a)
        assert all(len(o["output_ids"]) == 12 for o in sampled)
        llm.check_integrity()
        assert llm.core.kv.pool.num_in_use == 0


def test_bf16_prefix_cache_hits_on_graphs_keep_the_answer(small128):
    """bf16, flashinfer, CUDA graphs: the same image prompt again takes the cached pages (past the
    image, which skips the vision tower) and gives the first answer; the pool is whole after."""
    prompt, images = chat_prompt(IMAGE, "Describe it in detail."), _images([(120, 80)])
    with Engine(model_path=small128, dtype="bfloat16", page_size=16, kv_cache_tokens=KV) as llm:
        first = llm.generate(prompt=prompt, image_data=images, sampling_params=GREEDY)
        again = llm.generate(prompt=prompt, image_data=images, sampling_params=GREEDY)
        ids = llm.core.inputs.process(prompt=prompt, image_data=images).input_ids
        assert first["meta_info"]["cached_tokens"] == 0
        assert again["meta_info"]["cached_tokens"] == (len(ids) - 1) // 16 * 16
        assert again["output_ids"] == first["output_ids"]
        llm.check_integrity()
        assert llm.core.kv.pool.num_in_use == 0 and llm.core.kv.pool.num_cached > 0


@pytest.fixture(scope="module")
def engine_3b(model_3b):
    # prefix caching off: the prefill test compares the logits of every prompt position
    llm = Engine(model_path=model_3b, kv_cache_tokens=8192, max_step_tokens=4096, disable_prefix_caching=True)
    yield llm
    llm.shutdown()


def test_3b_bf16_prefill_logits_match_transformers(engine_3b, model_3b):
    core = engine_3b.core
    assert core.dtype == torch.bfloat16 and isinstance(core.runner.backend, FlashInferBackend)
    images = [noise_image(448, 336, seed=3)]
    inp = core.inputs.process(prompt=chat_prompt(IMAGE, "What is in this image? Answer briefly."), image_data=images)
    ids = inp.input_ids
    from epd.engine.sampling import SamplingParams

    req = core.new_request(inp, SamplingParams(max_new_tokens=1))
    core.add(req)
    chunks = core.scheduler.schedule()
    core._encode_images([req])
    runner = core.runner
    with torch.inference_mode():
        input_ids, positions, meta = runner.step_inputs(chunks)
        runner.backend.plan(meta)
        hidden = runner.model(runner.embed(chunks, input_ids), positions, runner.backend, core.kv.layers)
        ours = runner.model.logits(hidden)
        hf = hf_model_on(model_3b, "cuda", torch.bfloat16)
        theirs = hf(**hf_inputs(model_3b, ids, images, hf, "cuda")).logits[0].float()
    core.abort(req.rid)
    cos = cosine_rows(ours, theirs)
    assert cos.numel() == len(ids) and (cos >= 0.999).all(), f"min cosine {cos.min():.5f} at {cos.argmin()}"


def test_3b_bf16_decode_steps_match_transformers(engine_3b, model_3b):
    """Graph-replayed batch-1 decode steps (the decode GEMV kernels) against transformers' bf16 forward
    over the same tokens, at the prompt's last position and at every forced token."""
    core = engine_3b.core
    images = [noise_image(448, 336, seed=5)]
    inp = core.inputs.process(prompt=chat_prompt(IMAGE, "Describe it."), image_data=images)
    forced = torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    replays = core.runner.graphs.replays
    steps = forced_logits(core, [inp], [forced])
    assert core.runner.graphs.replays - replays == len(forced), "every decode step should replay a graph"
    ours = torch.cat([s[-1:] for s in steps])
    seq = list(inp.input_ids) + forced
    with torch.inference_mode():
        hf = hf_model_on(model_3b, "cuda", torch.bfloat16)
        theirs = hf(**hf_inputs(model_3b, seq, images, hf, "cuda")).logits[0, len(inp.input_ids) - 1:].float().cpu()
    cos = cosine_rows(ours, theirs)
    assert cos.numel() == len(forced) + 1 and (cos >= 0.999).all(), f"cosine by step {cos.tolist()}"


def test_3b_graph_decode_is_the_same_with_and_without_programmatic_dependent_launch(engine_3b):
    """Kernels launched to overlap their predecessor's tail wait for it before touching memory: the
    graph-replayed decode logits are bit-identical with the overlap (the default on sm90+) and without."""
    from epd.kernels import fused_ops

    core = engine_3b.core
    inp = core.inputs.process(prompt=chat_prompt("Count to ten, slowly."), image_data=[])
    forced = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    runs = {}
    for on in (True, False):
        fused_ops.PDL = on
        try:
            core.runner.graphs.capture()
            runs[on] = torch.cat([s[-1:] for s in forced_logits(core, [inp], [forced])])
        finally:
            fused_ops.PDL = True
    core.runner.graphs.capture()
    assert torch.equal(runs[True], runs[False])


def test_vision_fast_blocks_match_transformers_tower(engine_3b):
    from epd.models.qwen2_vl.vision import VisionTower

    core = engine_3b.core
    ref = VisionTower(core.model_config.family, core.device, core.dtype, attention="sdpa")  # transformers' own path
    from epd.models.qwen2_vl.vision_blocks import FastVisionBlock

    assert ref.module.config._attn_implementation == "sdpa" and not ref.fast_blocks
    assert core.vision.fast_blocks and all(isinstance(b, FastVisionBlock) for b in core.vision.module.blocks)
    pre = [core.inputs.image_processor.preprocess(noise_image(w, h, seed=i))
           for i, (w, h) in enumerate([(1280, 720), (448, 448)])]
    pixels = torch.cat([p.pixel_values for p in pre])
    grids = torch.tensor([p.grid_thw for p in pre])
    for a, b in zip(core.vision.encode_pixels(pixels, grids), ref.encode_pixels(pixels, grids), strict=True):
        assert a.shape == b.shape
        assert (cosine_rows(a.float(), b.float()) > 0.999).all()


def test_pixel_values_built_on_the_gpu_equal_the_cpu_ones(small128):
    """The vision tower's input made on the GPU (8-bit images copied, resized with Pillow's bicubic
    arithmetic, cut into patches and looked up there) is the CPU's (Pillow's resize), bit for bit,
    for a batch with an RGB and a grayscale image."""
    from epd.models.qwen2_vl.image_processor import ImageProcessor, pixel_values

    images = [noise_image(640, 480, seed=1), noise_image(300, 200, seed=2).convert("L"), noise_image(1280, 720, seed=3)]
    pre = ImageProcessor(small128, 2).preprocess_many(images)
    assert pre[0].spec is not None and pre[1].spec is None
    on_cpu = pixel_values(pre, "cpu")
    got = pixel_values(pre, "cuda")
    assert got.is_cuda and torch.equal(got.cpu(), on_cpu)
    later = ImageProcessor(small128, 2, resize_on_device=True).preprocess_many(images)
    assert later[0].resize_to is not None and later[2].resize_to is not None
    assert torch.equal(pixel_values(later, "cuda").cpu(), on_cpu)


def test_overlap_schedule_on_graphs_equals_synchronous(small128):
    """Greedy decode with the overlap schedule (next step's input ids read inside the CUDA graph from
    the step before's argmax) gives the synchronous engine's tokens, with a batch and with a stop
    token that the host sees one step late."""
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    prompts = [chat_prompt(f"Story {i}: " + "and then " * i) for i in range(4)]
    with Engine(model_path=small128, dtype="bfloat16", page_size=16, kv_cache_tokens=KV,
                disable_prefix_caching=True) as llm:   # both runs compute the same steps
        core = llm.core
        assert core.runner.graphs is not None and core.overlap
        runs = {}
        for overlap in (True, False):
            core.overlap = overlap
            replays = core.runner.graphs.replays
            batch = [o["output_ids"] for o in llm.generate(prompt=prompts, sampling_params=params)]
            assert core.runner.graphs.replays - replays >= 10, "decode steps should replay graphs"
            stop = batch[0][5]
            alone = llm.generate(prompt=prompts[0], sampling_params={**params, "stop_token_ids": [stop]})
            runs[overlap] = (batch, alone["output_ids"], stop)
        core.overlap = True
        batch, alone, stop = runs[True]
        assert runs[True] == runs[False]
        assert alone == batch[0][:batch[0].index(stop) + 1]
        llm.check_integrity()
        assert core.kv.pool.num_in_use == 0
