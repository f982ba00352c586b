"""The LLaVA built-ins render what the llava-hf checkpoints' own chat templates render, BOS included.

Each built-in is checked against its checkpoint's Jinja template (`epd.models.llava.chat_templates`)
as transformers renders it: a tokenizer's `apply_chat_template` (the HF Jinja dialect with its
`{% generation %}` tag, `bos_token` / `eos_token` from the tokenizer), `add_generation_prompt=True`.
The HF templates read a message's content as typed parts, so a string content goes to them as one
text part and an image as `{"type": "image"}`. The HF processor then adds the tokenizer's BOS token to
a prompt that does not start with it; the built-ins write that BOS as text, since EPD tokenizes
prompts with `add_special_tokens=False`.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from epd.chat.conversation import render_messages
from epd.models.llava.chat_templates import (
    LLAMA3_LLAVA_NEXT_TEMPLATE,
    LLAVA_1_5_TEMPLATE,
    LLAVA_NEXT_MISTRAL_TEMPLATE,
    LLAVA_ONEVISION_TEMPLATE,
)

# a tokenizer's special tokens: (leading ids 0.., after the vocabulary, BOS or None, EOS)
LLAMA2 = (("<unk>", "<s>", "</s>"), ("<image>", "<pad>"), "<s>", "</s>")
QWEN2 = ((), ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"), None, "<|im_end|>")
LLAMA3 = ((), ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<image>"), "<|begin_of_text|>", "<|eot_id|>")

# built-in -> (the checkpoint's template, its tokenizer's special tokens)
CHECKPOINTS = {
    "vicuna_v1.1": (LLAVA_1_5_TEMPLATE, LLAMA2),  # llava-1.5-7b-hf, llava-v1.6-vicuna-7b-hf
    "chatml-llava": (LLAVA_ONEVISION_TEMPLATE, QWEN2),  # llava-onevision-qwen2-7b-ov-hf
    "llava_llama_3": (LLAMA3_LLAVA_NEXT_TEMPLATE, LLAMA3),  # llama3-llava-next-8b-hf
}


def image(name: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"http://x/{name}.png"}}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


QUESTION = [image("cat"), text("What is this?")]
MESSAGES = {
    "text_only": [{"role": "user", "content": "Tell me a joke."}],
    "image_then_text": [{"role": "user", "content": QUESTION}],
    "text_then_image": [{"role": "user", "content": [text("What is this?"), image("cat")]}],
    "image_only": [{"role": "user", "content": [image("cat")]}],
    "two_images": [{"role": "user", "content": [text("Left:"), image("a"), text(" Right:"), image("b")]}],
    "system": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": QUESTION}],
    "multi_turn": [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [text("And this?"), image("dog")]},
        {"role": "assistant", "content": [text("A dog.")]},
        {"role": "user", "content": "Which is bigger?"},
    ],
}


@functools.cache
def hf_tokenizer(special: tuple[Any, ...], chat_template: str) -> Any:
    """A byte-level BPE tokenizer with the checkpoint's special tokens, adding BOS as its tokenizer does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from epd.models.tiny_tokenizer import build_bpe

    leading, added, bos, eos = special
    tok = build_bpe(1000, 0, added, leading)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, chat_template=chat_template)


def hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as HF multimodal templates take them: content as text and image parts."""
    def part(p: dict[str, Any]) -> dict[str, Any]:
        return p if p["type"] == "text" else {"type": "image"}

    return [{"role": m["role"], "content": [text(m["content"])] if isinstance(m["content"], str)
             else [part(p) for p in m["content"]]} for m in messages]


def hf_prompt(name: str, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
    """What the HF processor makes of the chat: the rendered text with its BOS (as the processor adds it
    when tokenizing), and the token ids."""
    template, special = CHECKPOINTS[name]
    tok, bos = hf_tokenizer(special, template), special[2]
    rendered = tok.apply_chat_template(hf_messages(messages), tokenize=False, add_generation_prompt=True)
    has_bos = bos is not None and rendered.startswith(bos)
    ids = tok(rendered, add_special_tokens=not has_bos)["input_ids"]
    return (rendered if has_bos or bos is None else bos + rendered), ids


@pytest.mark.parametrize("case", sorted(MESSAGES))
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_builtin_prompt_is_what_the_llava_hf_template_renders(name: str, case: str) -> None:
    messages = MESSAGES[case]
    out = render_messages(messages, template=name)
    expected, _ = hf_prompt(name, messages)
    assert out.text == expected
    urls = [p["image_url"]["url"] for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p["type"] == "image_url"]
    assert [i.url for i in out.images] == urls and out.text.count("<image>") == len(urls)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_builtin_token_ids_are_the_hf_processor_ids(name: str) -> None:
    """EPD tokenizes the built-in's prompt without special tokens; the processor adds BOS to its own."""
    template, special = CHECKPOINTS[name]
    tok = hf_tokenizer(special, template)
    for case, messages in MESSAGES.items():
        text_ids = tok(render_messages(messages, template=name).text, add_special_tokens=False)["input_ids"]
        assert text_ids == hf_prompt(name, messages)[1], case


def test_vicuna_and_onevision_prompts_spelled_out() -> None:
    """The llava-hf formats, written out: no default system turn, no EOS after an answer."""
    messages = MESSAGES["multi_turn"][:4]
    assert render_messages(messages, template="vicuna_v1.1").text == (
        "<s>Be brief. USER: <image>\nWhat is this? ASSISTANT: A cat. USER: <image>\nAnd this? ASSISTANT:"
    )
    assert render_messages(messages, template="chatml-llava").text == (
        "<|im_start|>system \nBe brief.<|im_end|><|im_start|>user <image>\nWhat is this?<|im_end|>"
        "<|im_start|>assistant \nA cat.<|im_end|><|im_start|>user <image>\nAnd this?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert render_messages(MESSAGES["two_images"], template="llava_llama_3").text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image><image>\nLeft:<|eot_id|>"
        "\n Right:<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# One image and a question, as the checkpoints' model cards and serving examples write the prompt.
DOCUMENTED = {
    "llava-1.5": (LLAVA_1_5_TEMPLATE, LLAMA2, "USER: <image>\nWhat is shown in this image? ASSISTANT:"),
    "llava-v1.6-mistral": (LLAVA_NEXT_MISTRAL_TEMPLATE, LLAMA2, "[INST] <image>\nWhat is shown in this image? [/INST]"),
    "llava-onevision": (LLAVA_ONEVISION_TEMPLATE, QWEN2,
                        "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"),
    "llama3-llava-next": (LLAMA3_LLAVA_NEXT_TEMPLATE, LLAMA3,
                          "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown in this image?<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


@pytest.mark.parametrize("checkpoint", sorted(DOCUMENTED))
def test_llava_hf_templates_render_the_documented_prompt(checkpoint: str) -> None:
    template, special, documented = DOCUMENTED[checkpoint]
    messages = [{"role": "user", "content": [{"type": "image"}, text("What is shown in this image?")]}]
    tok = hf_tokenizer(special, template)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == documented
