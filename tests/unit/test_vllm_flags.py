"""vLLM's flags as vLLM users pass them: implemented ones change what the engine or router does,
the ones for features EPD does not have stop the process at once with a message saying what to do.
The checkpoint's generation_config.json gives the sampling defaults of what a request leaves out
(--generation-config auto), as in vLLM."""

from __future__ import annotations

import json
import shutil

import pytest
from test_router_app import make_client, prompts  # noqa: F401 - the fixture

from epd import Engine
from epd.engine.engine_args import add_engine_args, engine_kwargs
from epd.node.runtime import NodeArgs
from router.main import build_parser, main
from router.settings import RouterSettings


def _engine_args(*argv: str) -> dict:
    import argparse

    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    return engine_kwargs(ap.parse_args(list(argv)))


def test_vllm_engine_flags_map_to_the_engine():
    got = _engine_args("--max-num-seqs", "3", "--gpu-memory-utilization", "0.4", "--seed", "7",
                       "--no-enable-prefix-caching", "--enforce-eager", "--trust-remote-code", "-tp", "1")
    assert (got["max_running_requests"], got["gpu_memory_utilization"], got["seed"]) == (3, 0.4, 7)
    assert got["disable_prefix_caching"] and got["disable_cuda_graph"]
    assert not _engine_args("--enable-prefix-caching")["disable_prefix_caching"]


def test_tensor_parallel_size_reaches_the_engine():
    assert _engine_args("-tp", "2")["tensor_parallel_size"] == 2
    assert _engine_args("--tensor-parallel-size", "4")["tensor_parallel_size"] == 4
    assert _engine_args()["tensor_parallel_size"] == 1


def test_mm_processor_kwargs_is_refused_naming_what_to_do(tiny_models, capsys):
    assert main(["--model", tiny_models["qwen2_vl"], "--mm-processor-kwargs", '{"max_pixels": 1000}']) == 2
    assert "preprocessor_config.json" in capsys.readouterr().err


def test_seed_makes_sampled_answers_repeat(tiny_models):
    params = {"temperature": 1.0, "max_new_tokens": 8}
    runs = []
    for _ in range(2):
        with Engine(model_path=tiny_models["qwen2_vl"], device="cpu", seed=11) as llm:
            runs.append([llm.generate(prompt="hello there", sampling_params=params)["output_ids"] for _ in range(2)])
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_node_takes_the_engine_flags(tiny_models, monkeypatch):
    monkeypatch.setenv("EPD_CLUSTER_SECRET", "s" * 32)
    args = NodeArgs.from_cli("decode", ["--model", tiny_models["qwen2_vl"], "--redis-url", "redis://h:1/0",
                                        "--max-model-len", "64", "--dtype", "float64", "--max-num-seqs", "5"])
    assert (args.engine["max_model_len"], args.engine["dtype"], args.engine["max_running_requests"]) == \
        (64, "float64", 5)


def test_generation_config_gives_the_defaults_of_what_a_request_leaves_out(tiny_models, tmp_path):
    path = str(tmp_path / "m")
    shutil.copytree(tiny_models["qwen2_vl"], path)
    with open(f"{path}/generation_config.json") as f:
        gen = json.load(f)
    gen.update(temperature=0.0, top_p=0.9, max_new_tokens=5)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump(gen, f)
    auto = RouterSettings.from_cli(build_parser().parse_args(["--model", path]))
    assert auto.sampling_defaults == {"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 5}
    assert RouterSettings.from_cli(build_parser().parse_args(["--model", path, "--generation-config",
                                                              "vllm"])).sampling_defaults == {}


def test_router_applies_generation_defaults(prompts):  # noqa: F811
    client, backend = make_client(prompts, sampling_defaults={"temperature": 0.0, "top_k": 4, "max_new_tokens": 2})
    with client:
        assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "hi", "temperature": 0.5,
                                                    "max_tokens": 3}).status_code == 200
    first, second = backend.requests[0].params, backend.requests[1].params
    assert (first.temperature, first.top_k, first.max_new_tokens) == (0.0, 4, 2)
    assert (second.temperature, second.top_k, second.max_new_tokens) == (0.5, 4, 3)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_per_request_mm_processor_kwargs_is_a_400_naming_it(prompts, route):  # noqa: F811
    client, _ = make_client(prompts)
    body = {"mm_processor_kwargs": {"max_pixels": 100}, "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"})
    with client:
        resp = client.post(route, json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "mm_processor_kwargs"
