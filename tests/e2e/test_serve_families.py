"""`epd serve` with each LLaVA variant and the chat template SGLang's docs name for it, through the
real `openai` client, streamed and not: greedy tokens equal transformers' on the same checkpoint
(prompt rendered by the checkpoint's own template, which the built-in matches). The first one is
asked for by name (`tiny-random-llava`), as a new user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest
from openai_support import IDS, assert_matches, data_uri, image_part, reference, start_until_line, token_ids
from support import noise_image, png_bytes

# (model, --chat-template or None for the checkpoint's own)
SERVED = [("tiny-random-llava", "vicuna_v1.1"), ("llava_next:tiny-llama3", "llava_llama_3"),
          ("llava_onevision", "chatml-llava"), ("llava_next", None)]


@pytest.mark.parametrize("model,template", SERVED)
def test_llava_variants_through_epd_serve_and_the_openai_client(tiny_models, tmp_path, model, template):
    env = dict(os.environ, HOME=str(tmp_path))   # tiny-random-* is built under ~/.cache/epd
    path = os.path.join(tmp_path, ".cache", "epd", model) if model.startswith("tiny-random") else tiny_models[model]
    cmd = [sys.executable, "-m", "epd.cli", "serve", "--model", model if model.startswith("tiny") else path,
           "--port", "0", "--device", "cpu", "--log-dir", str(tmp_path / "logs"), "--log-level", "warning"]
    cmd += ["--chat-template", template] if template else []
    proc, log, line = start_until_line(cmd, "EPD ready on ", 300, "epd serve", env=env)
    try:
        client = openai.OpenAI(base_url=line.split()[3], api_key="none", max_retries=0, timeout=60)
        served = client.models.list().data[0].id
        images = [png_bytes(noise_image(120, 80, seed=1)), png_bytes(noise_image(64, 150, seed=2))]
        content = [image_part(data_uri(images[0])), {"type": "text", "text": "Compare it with"},
                   image_part(data_uri(images[1]))]
        prompt_ids, expected = reference(path, content, images, 10)
        messages = [{"role": "user", "content": content}]
        whole = client.chat.completions.create(model=served, messages=messages, max_tokens=10, temperature=0, **IDS)
        assert_matches(whole, prompt_ids, expected)
        chunks = list(client.chat.completions.create(model=served, messages=messages, max_tokens=10, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            whole.choices[0].message.content
        text = [{"type": "text", "text": "Write a short poem about the sea."}]
        prompt_ids, expected = reference(path, text, [], 10)
        assert token_ids(client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": text}], max_tokens=10, temperature=0,
            **IDS)) == expected
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("arch,template,topology", [("mllama", "llama_3_vision", []),
                                                   ("llama4", "llama-4", ["--colocated", "1"])],
                         ids=["mllama-1E1P1D", "llama4-colocated"])
def test_sglang_vision_doc_calls_through_epd_serve_and_the_openai_client(tiny_models, tmp_path, arch, template,
                                                                          topology):
    """SGLang's vision-doc calls (one image; two images, "describe the first image in one sentence,
    then the second") for Llama-3.2-Vision with `--chat-template llama_3_vision`, served split over
    encode / prefill / decode pools (epd serve's defaults), and Llama 4 with `llama-4` by one
    colocated node: transformers' tokens (both families' other topology: test_disagg_families)."""
    path = tiny_models[arch]
    cmd = [sys.executable, "-m", "epd.cli", "serve", "--model", path, "--port", "0", "--device", "cpu",
           "--log-dir", str(tmp_path / "logs"), "--log-level", "warning", "--chat-template", template, *topology]
    proc, log, line = start_until_line(cmd, "EPD ready on ", 300, "epd serve")
    try:
        client = openai.OpenAI(base_url=line.split()[3], api_key="none", max_retries=0, timeout=60)
        served = client.models.list().data[0].id
        images = [png_bytes(noise_image(120, 80, seed=1)), png_bytes(noise_image(64, 150, seed=2))]
        for content in ([image_part(data_uri(images[0])), {"type": "text", "text": "What is in this image?"}],
                        [image_part(data_uri(images[0])), image_part(data_uri(images[1])),
                         {"type": "text", "text": "Describe the first image in one sentence, then the second."}]):
            shown = images[:sum(part["type"] == "image_url" for part in content)]
            prompt_ids, expected = reference(path, content, shown, 10)
            messages = [{"role": "user", "content": content}]
            whole = client.chat.completions.create(model=served, messages=messages, max_tokens=10, temperature=0,
                                                   **IDS)
            assert_matches(whole, prompt_ids, expected)
            chunks = list(client.chat.completions.create(model=served, messages=messages, max_tokens=10,
                                                         temperature=0, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                whole.choices[0].message.content
        body = json.dumps({"model": served, "max_tokens": 10, "temperature": 0, "messages": [
            {"role": "user", "content": [image_part(data_uri(images[0])),
                                         {"type": "text", "text": "What is in this image?"}]}]})
        curl = subprocess.run(["curl", "-s", f"{line.split()[3]}/chat/completions", "-H",
                               "Content-Type: application/json", "-d", body], capture_output=True, text=True,
                              timeout=60)   # the doc's curl request, one image
        one_image = client.chat.completions.create(model=served, messages=json.loads(body)["messages"],
                                                   max_tokens=10, temperature=0)   # checked against transformers above
        assert json.loads(curl.stdout)["choices"][0]["message"]["content"] == one_image.choices[0].message.content
    finally:
        proc.kill()
        proc.wait()
