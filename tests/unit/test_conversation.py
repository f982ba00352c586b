"""epd.chat.conversation: built-in chat formats, OpenAI message validation, Jinja and HF tokenizer templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epd.chat.conversation import (
    ChatTemplateError,
    Conversation,
    ImageRef,
    chat_templates,
    get_chat_template,
    render_messages,
)

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

# A Qwen2-VL-like chat template for the tokenizer path, written for this test.
QWEN_LIKE_JINJA = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    spec = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": spec}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


ONE_IMAGE = [{"role": "user", "content": [image_part("http://x/cat.png"), text_part("What is this?")]}]


def tiny_tokenizer(chat_template: str | None = QWEN_LIKE_JINJA) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    words = ["[UNK]", "system", "user", "assistant", "You", "are", "a", "helpful", "assistant.", "What", "is", "this?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", chat_template=chat_template
    )


def render_error(messages: Any, **kw: Any) -> ChatTemplateError:
    with pytest.raises(ChatTemplateError) as info:
        render_messages(messages, **kw)
    return info.value


# ---------------------------------------------------------------- built-in formats

EXPECTED_ONE_IMAGE = {
    "qwen2-vl": f"{QWEN_SYSTEM}<|im_start|>user\n{QWEN_IMAGE}What is this?<|im_end|>\n<|im_start|>assistant\n",
    # The LLaVA built-ins as llava-hf's templates write them (tests/unit/test_llava_chat_templates.py)
    "chatml-llava": "<|im_start|>user <image>\nWhat is this?<|im_end|><|im_start|>assistant\n",
    "llava_llama_3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "vicuna_v1.1": "<s>USER: <image>\nWhat is this? ASSISTANT:",
    "llama_3_vision": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama-4": (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>What is this?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ONE_IMAGE))
def test_builtin_renders_one_image_question_exactly(name: str) -> None:
    out = render_messages(ONE_IMAGE, template=name)
    assert out.text == EXPECTED_ONE_IMAGE[name]
    assert out.images == [ImageRef("http://x/cat.png", "auto", "messages[0].content[0].image_url.url")]
    assert out.stop and all(s in get_chat_template(name).stop_str for s in out.stop)


def test_qwen2_vl_multi_turn_keeps_images_inline_and_in_order() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [text_part("Compare "), image_part("a.png", "low"), text_part(" and "),
                                     {"type": "image", "image": "b.png"}]},
        {"role": "assistant", "content": "Same."},
        {"role": "user", "content": "Sure?"},
    ]
    out = render_messages(messages, template="qwen2.5-vl")
    assert out.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nCompare {QWEN_IMAGE} and {QWEN_IMAGE}<|im_end|>\n"
        "<|im_start|>assistant\nSame.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert [(i.url, i.detail, i.param) for i in out.images] == [
        ("a.png", "low", "messages[1].content[1].image_url.url"),
        ("b.png", "auto", "messages[1].content[3].image"),
    ]


def test_vicuna_ends_each_text_with_a_space_and_llava_puts_images_first() -> None:
    messages = [
        {"role": "user", "content": [text_part("Describe it."), image_part("a.png")]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"},
    ]
    out = render_messages(messages, template="vicuna_v1.1", add_generation_prompt=False)
    assert out.text == "<s>USER: <image>\nDescribe it. ASSISTANT: A cat. USER: Colour? "


def test_llama_templates_trim_the_system_message_and_developer_means_system() -> None:
    messages = [{"role": "developer", "content": "  Answer in French. \n"}, {"role": "user", "content": "Hi"}]
    assert render_messages(messages, template="llama-4").text == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nAnswer in French.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )


def test_llama_3_vision_refuses_a_system_message_with_images_only() -> None:
    with_system = [{"role": "system", "content": "Be brief."}, *ONE_IMAGE]
    err = render_error(with_system, template="llama_3_vision")
    assert err.param == "messages[0].role" and "no system message in a chat with images" in str(err)
    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" in render_messages(
        text_only, template="llama_3_vision"
    ).text


def test_builtins_take_a_system_message_only_first() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]
    err = render_error(messages, template="qwen2-vl")
    assert err.param == "messages[1].role" and "system message only first" in str(err)


def test_conversation_api_builds_prompts_without_messages() -> None:
    conv = get_chat_template("qwen2-vl")
    other = conv.copy()
    token = conv.append_image(ImageRef("cat.png"))
    conv.append_message(conv.roles[0], token + "Hi")
    conv.append_message("assistant", None)
    assert conv.get_prompt() == f"{QWEN_SYSTEM}<|im_start|>user\n{QWEN_IMAGE}Hi<|im_end|>\n<|im_start|>assistant\n"
    assert other.messages == [] and chat_templates["qwen2-vl"].messages == []
    assert [i.url for i in conv.images] == ["cat.png"]


# ---------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        ([], "messages", "non-empty list"),
        ("hello", "messages", "non-empty list"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role", "unsupported role 'robot'"),
        ([{"role": "user"}], "messages[0].content", "user message has no content"),
        ([{"role": "user", "content": 5}], "messages[0].content", "must be a string or a list"),
        ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", "must be an object with a 'type'"),
        ([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], "messages[0].content[0].type",
         "unsupported content part type 'video'"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text",
         "must be a string"),
        ([{"role": "system", "content": [image_part("a.png")]}], "messages[0].content[0].type",
         "images are only allowed in user messages, not in system messages"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [image_part("a.png")]}],
         "messages[1].content[0].type", "not in assistant messages"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
         "messages[0].content[0].image_url.url", "has no image URL"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].image_url",
         "must be an object with a 'url'"),
        ([{"role": "user", "content": [image_part("a.png", "ultra")]}], "messages[0].content[0].image_url.detail",
         "must be 'auto', 'low' or 'high'"),
        ([{"role": "user", "content": [{"type": "image"}]}], "messages[0].content[0].image", "has no image URL"),
    ],
)
def test_invalid_messages_name_the_field(messages: Any, param: str, message: str) -> None:
    err = render_error(messages, template="qwen2-vl")
    assert err.param == param and message in str(err) and str(err).startswith(param)
    assert isinstance(err, ValueError)


def test_unknown_template_and_missing_template_are_reported() -> None:
    err = render_error(ONE_IMAGE, template="mystery-7b")
    assert err.param == "chat_template" and "unknown chat template 'mystery-7b'" in str(err)
    assert "qwen2-vl" in str(err) and "llama-4" in str(err)
    assert "no chat template" in str(render_error(ONE_IMAGE))
    assert "no chat template" in str(render_error(ONE_IMAGE, tokenizer=tiny_tokenizer(chat_template=None)))


# ---------------------------------------------------------------- template files


def test_json_conversation_file_round_trips(tmp_path: Path) -> None:
    data = get_chat_template("llama-4").to_dict() | {"name": "my-llama", "system_message": "Hello."}
    path = tmp_path / "my-llama.json"
    path.write_text(json.dumps(data))
    text = render_messages(ONE_IMAGE, template=str(path)).text
    assert text.startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\nHello.<|eot|>")
    assert text.endswith(EXPECTED_ONE_IMAGE["llama-4"].removeprefix("<|begin_of_text|>"))
    assert Conversation.from_dict(data).to_dict() == data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"name": "x"}, "has no 'roles'"),
        ({"name": "x", "roles": ["u"]}, "has invalid roles"),
        ({"name": "x", "roles": ["u", "a"], "sep_style": "zigzag"}, "'zigzag' is not a valid SeparatorStyle"),
        ({"name": "x", "roles": ["u", "a"], "colour": "red"}, "colour"),
        ({"name": "x", "roles": ["u", "a"], "sep": 3}, "has invalid sep"),
    ],
)
def test_bad_json_conversation_files_are_refused(tmp_path: Path, content: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    err = render_error(ONE_IMAGE, template=str(path))
    assert err.param == "chat_template" and message in str(err)


def test_jinja_file_inline_jinja_and_hf_chat_template_json(tmp_path: Path) -> None:
    expected = EXPECTED_ONE_IMAGE["qwen2-vl"]
    path = tmp_path / "qwen.jinja"
    path.write_text(QWEN_LIKE_JINJA)
    assert render_messages(ONE_IMAGE, template=str(path)).text == expected
    assert render_messages(ONE_IMAGE, template=QWEN_LIKE_JINJA).text == expected
    hf_json = tmp_path / "chat_template.json"
    hf_json.write_text(json.dumps({"chat_template": QWEN_LIKE_JINJA}))
    assert render_messages(ONE_IMAGE, template=str(hf_json)).text == expected
    missing = render_error(ONE_IMAGE, template=str(tmp_path / "nope.jinja"))
    assert "cannot load chat template file" in str(missing)


def test_template_errors_become_chat_template_errors() -> None:
    raising = "{{ raise_exception('only user messages, please') }}"
    err = render_error(ONE_IMAGE, template=raising)
    assert err.param == "chat_template" and "only user messages, please" in str(err)
    assert "chat template failed" in str(render_error(ONE_IMAGE, template="{% for %}"))


# ---------------------------------------------------------------- the tokenizer's own template


def test_tokenizer_template_gets_one_image_part_per_image() -> None:
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": [image_part("a.png"), image_part("b.png"), text_part("What is this?")]}]
    out = render_messages(messages, tokenizer=tok)
    assert out.text == f"{QWEN_SYSTEM}<|im_start|>user\n{QWEN_IMAGE}{QWEN_IMAGE}What is this?<|im_end|>\n" \
        "<|im_start|>assistant\n"
    assert [i.url for i in out.images] == ["a.png", "b.png"]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.encode(out.text, add_special_tokens=False).count(pad) == 2
    assert render_messages(ONE_IMAGE, tokenizer=tok).text == EXPECTED_ONE_IMAGE["qwen2-vl"]
    assert not render_messages(ONE_IMAGE, tokenizer=tok, add_generation_prompt=False).text.endswith("assistant\n")


def test_named_template_wins_over_the_tokenizer_and_jinja_sees_its_bos() -> None:
    tok = tiny_tokenizer()
    assert render_messages(ONE_IMAGE, tokenizer=tok, template="llama-4").text == EXPECTED_ONE_IMAGE["llama-4"]
    assert render_messages(ONE_IMAGE, tokenizer=tok, template="{{ bos_token }}x").text == "<|endoftext|>x"
    err = render_error(ONE_IMAGE, tokenizer=tok, template="{{ raise_exception('no images') }}")
    assert err.param == "chat_template" and "no images" in str(err)


TOOL_TEMPLATE = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}{% for m in messages %}"
                 "<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}"
                 "(call {{ c.function.name }} {{ c.function.arguments | tojson }})"
                 "{% endfor %}{% if m.tool_call_id %}(answers {{ m.tool_call_id }}){% endif %}{% endfor %}")


def test_tools_and_tool_turns_reach_a_jinja_template():
    """The tools, an assistant's calls (arguments as an object, as Qwen's template writes them) and
    a tool's answer all reach the template; built-in templates cannot show them and say so."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "-7"}]}]
    text = render_messages(messages, template=TOOL_TEMPLATE, tools=tools, add_generation_prompt=False).text
    assert text == ('[tool weather]<user>Oslo?<assistant>(call weather {"city": "Oslo"})'
                    "<tool>-7(answers c1)")
    with pytest.raises(ChatTemplateError) as err:
        render_messages(messages, template="qwen2-vl")
    assert err.value.param == "messages[1]" and "cannot show tools" in str(err.value)
    with pytest.raises(ChatTemplateError, match="tool_calls"):
        render_messages([{"role": "user", "content": "x", "tool_calls": []}], template=TOOL_TEMPLATE)
