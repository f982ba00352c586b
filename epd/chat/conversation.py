"""Chat templates, and rendering OpenAI-style ``messages`` into one prompt string.

Lifecycle of a chat request:
1. ``render_messages`` validates ``messages`` (roles, content parts, where images may go) and lists
   the images in order of appearance as ``ImageRef`` (URL / data URI / path, ``detail``, and the
   ``param`` path that a ``MediaError`` for it should report).
2. ``template`` picks the renderer:
   - a ``Conversation``: a built-in of ``chat_templates`` ("qwen2-vl", "llama-4", ...) or a JSON
     conversation file (``Conversation.to_dict`` format); each image part becomes ``image_token``;
   - Jinja: a ``.jinja`` file, an HF ``chat_template.json`` file, or an inline template string;
   - ``None``: the tokenizer's (or HF processor's) own ``chat_template``. Image parts are passed as
     ``{"type": "image"}``, so Qwen2-VL's template writes ``<|vision_start|><|image_pad|><|vision_end|>``.
3. The caller loads ``RenderedPrompt.images`` with ``epd.media.loading`` and expands each image token into
   the model's per-patch placeholders; ``RenderedPrompt.stop`` lists a built-in's stop strings.

Prompts are complete, BOS text included where the model wants one (as HF ``apply_chat_template``
output is): tokenize them with ``add_special_tokens=False``.

Built-ins follow the models' own templates, with two simplifications: ``llama_3_vision`` leaves out
the "Cutting Knowledge Date" system block Meta's template adds to image-free chats, and every
built-in accepts a system message only as the first message. ``vicuna_v1.1``, ``chatml-llava`` and
``llava_llama_3`` render what the llava-hf checkpoints' templates (``epd.models.llava.chat_templates``)
render, plus the BOS text that the HF processor adds as a token (a string content is one text part).
Errors raise ``ChatTemplateError`` (a ``ValueError``) whose ``param`` names the field, e.g.
``messages[1].content[0].type``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import jinja2

from epd.chat.jinja import reads_typed_parts, render_jinja
from epd.chat.tools import tool_fields


class ChatTemplateError(ValueError):
    """A request's messages or chat template cannot be rendered; ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class SeparatorStyle(Enum):
    """How turns are joined; ``Conversation.roles`` hold each turn's full header."""

    TAGGED = "tagged"  # header + content + sep (ChatML, Llama 3, Llama 4)
    ADD_COLON_TWO = "add_colon_two"  # "ROLE: content" + sep after user, sep2 after assistant (Vicuna)


@dataclass(frozen=True)
class ImageRef:
    """One image of a request, in order of appearance."""

    url: Any  # URL, data URI or path as sent; an HF-style image part may carry a PIL image or bytes
    detail: str = "auto"
    param: str = ""  # where it was, e.g. "messages[1].content[0].image_url.url"


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    images: list[ImageRef]
    stop: tuple[str, ...] = ()


@dataclass
class Conversation:
    """A chat format, plus the turns of one conversation being built (``copy()`` a template first)."""

    name: str
    roles: tuple[str, str]  # full (user, assistant) turn headers
    sep_style: SeparatorStyle = SeparatorStyle.TAGGED
    sep: str = ""
    sep2: str = ""
    system_template: str = "{system_message}"
    system_message: str | None = None  # None: no system turn at all
    stop_str: tuple[str, ...] = ()
    image_token: str = "<image>"  # the text standing for one image before processor expansion
    text_format: str = "{text}"  # how each text part of a turn is written (LLaVA: "{text} ", "\n{text}")
    generation_prompt: str | None = None  # what opens the answer; None: the assistant header
    prefix: str = ""  # BOS text, if the model wants one
    images_first: bool = False  # LLaVA: a message's images go before its text
    strip_system: bool = False
    strip_content: bool = False
    system_with_images: bool = True  # False: refuse a system message when the chat has images
    messages: list[tuple[str, str | None]] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)

    def copy(self) -> Conversation:
        return dataclasses.replace(self, messages=list(self.messages), images=list(self.images))

    def append_message(self, role: str, content: str | None) -> None:
        """Add a turn; ``role`` is "user"/"assistant" or a header of ``roles``; None leaves it open."""
        if role not in ("user", "assistant"):
            if role not in self.roles:
                raise ChatTemplateError(f"template {self.name!r} has no role {role!r}", param="role")
            role = "user" if role == self.roles[0] else "assistant"
        self.messages.append((role, content))

    def append_image(self, image: ImageRef) -> str:
        """Record an image; returns the text that stands for it in the prompt."""
        self.images.append(image)
        return self.image_token

    def format_content(self, parts: Sequence[str | ImageRef]) -> str:
        """One turn's text from text and image parts (images recorded with ``append_image``)."""
        if self.images_first:
            parts = [p for p in parts if isinstance(p, ImageRef)] + [p for p in parts if isinstance(p, str)]
        return "".join(self.text_format.replace("{text}", p) if isinstance(p, str) else self.append_image(p)
                       for p in parts)

    def get_prompt(self) -> str:
        out = [self.prefix]
        if self.system_message is not None:
            system = self.system_message.strip() if self.strip_system else self.system_message
            out.append(self.system_template.replace("{system_message}", system) + self.sep)
        for role, content in self.messages:
            header = self.roles[0 if role == "user" else 1]
            if content is not None and self.strip_content:
                content = content.strip()
            if content is None:
                opened = header if self.sep_style is SeparatorStyle.TAGGED else header + ":"
                out.append(opened if self.generation_prompt is None else self.generation_prompt)
            elif self.sep_style is SeparatorStyle.TAGGED:
                out.append(header + content + self.sep)
            else:
                out.append(f"{header}: {content}{self.sep if role == 'user' else self.sep2}")
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        """The format as JSON-ready data (no turns); ``from_dict`` reads it back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["messages"], out["images"]
        out.update(sep_style=self.sep_style.value, roles=list(self.roles), stop_str=list(self.stop_str))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Conversation:
        """Read ``to_dict`` output (a JSON template file); all fields but ``name`` and ``roles`` optional."""
        kw = {k: v for k, v in data.items() if k not in ("messages", "images")}
        try:
            kw.update(roles=tuple(kw["roles"]), stop_str=tuple(kw.get("stop_str", ())),
                      sep_style=SeparatorStyle(kw.get("sep_style", "tagged")))
            conv = cls(**kw)
        except KeyError as exc:
            raise _err("chat_template", f"conversation template has no {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise _err("chat_template", f"invalid conversation template: {exc}") from exc
        texts = ("name", "sep", "sep2", "system_template", "image_token", "prefix", "text_format")
        bad = [k for k in texts if not isinstance(getattr(conv, k), str)]
        bad += [k for k in ("roles", "stop_str") if not all(isinstance(x, str) for x in getattr(conv, k))]
        bad += [k for k in ("system_message", "generation_prompt") if not isinstance(getattr(conv, k), str | None)]
        if len(conv.roles) != 2:
            bad.append("roles (two headers)")
        if bad:
            raise _err("chat_template", f"conversation template {conv.name!r} has invalid {', '.join(bad)}")
        return conv


chat_templates: dict[str, Conversation] = {}


def register_chat_template(conv: Conversation, *, override: bool = False) -> None:
    if conv.name in chat_templates and not override:
        raise ValueError(f"chat template {conv.name!r} is already registered")
    chat_templates[conv.name] = conv


def get_chat_template(name: str) -> Conversation:
    """A fresh copy of a registered template."""
    if name not in chat_templates:
        known = ", ".join(sorted(chat_templates))
        raise _err("chat_template", f"unknown chat template {name!r}; use one of {known}, or a file")
    return chat_templates[name].copy()


def _header(role: str, start: str = "<|start_header_id|>", end: str = "<|end_header_id|>") -> str:
    return f"{start}{role}{end}\n\n"  # Llama 3 turn header; Llama 4 passes its own start / end


_CHATML: dict[str, Any] = dict(
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>\n",
    system_template="<|im_start|>system\n{system_message}", system_message="You are a helpful assistant.",
)
_LLAMA3: dict[str, Any] = dict(
    prefix="<|begin_of_text|>", roles=(_header("user"), _header("assistant")), sep="<|eot_id|>",
    system_template=_header("system") + "{system_message}", strip_system=True,
)
_L4 = functools.partial(_header, start="<|header_start|>", end="<|header_end|>")

for _conv in (
    Conversation(name="qwen2-vl", **_CHATML, stop_str=("<|im_end|>", "<|endoftext|>"),
                 image_token="<|vision_start|><|image_pad|><|vision_end|>"),
    # The three LLaVA built-ins: llava-hf's templates (no default system turn), the tokenizer's BOS first.
    Conversation(name="chatml-llava", roles=("<|im_start|>user ", "<|im_start|>assistant "), sep="<|im_end|>",
                 system_template="<|im_start|>system {system_message}", text_format="\n{text}",
                 generation_prompt="<|im_start|>assistant\n", images_first=True, stop_str=("<|im_end|>",)),
    Conversation(name="llava_llama_3", **dict(_LLAMA3, sep="", strip_system=False), text_format="\n{text}<|eot_id|>",
                 images_first=True, stop_str=("<|eot_id|>", "<|end_of_text|>")),
    Conversation(name="vicuna_v1.1", prefix="<s>", roles=("USER", "ASSISTANT"), text_format="{text} ",
                 sep_style=SeparatorStyle.ADD_COLON_TWO, image_token="<image>\n", images_first=True,
                 stop_str=("</s>",)),
    Conversation(name="llama_3_vision", **_LLAMA3, image_token="<|image|>", system_with_images=False,
                 stop_str=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),
    Conversation(
        name="llama-4", prefix="<|begin_of_text|>", roles=(_L4("user"), _L4("assistant")),
        sep="<|eot|>", system_template=_L4("system") + "{system_message}", strip_system=True,
        image_token="<|image|>", stop_str=("<|eot|>", "<|eom|>", "<|end_of_text|>"),
    ),
):
    register_chat_template(_conv)
register_chat_template(dataclasses.replace(chat_templates["qwen2-vl"].copy(), name="qwen2.5-vl"))



@dataclass
class _Turn:
    role: str  # "system" | "user" | "assistant" | "tool"
    parts: list[str | ImageRef]
    plain: bool  # content was a plain string
    param: str
    extra: dict[str, Any] = field(default_factory=dict)   # an assistant's tool_calls, a tool's tool_call_id


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def render_messages(
    messages: Sequence[Mapping[str, Any]], *, tokenizer: Any = None, template: str | None = None,
    add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
) -> RenderedPrompt:
    """Render OpenAI-style chat ``messages`` to prompt text plus the images in order of appearance.

    ``template``: a built-in name, a ``.jinja`` / ``.json`` file, an inline Jinja string, or None for
    ``tokenizer``'s own chat template (anything with ``apply_chat_template``: tokenizer or processor).
    """
    turns = _parse_messages(messages)
    images = [p for turn in turns for p in turn.parts if isinstance(p, ImageRef)]
    source = _resolve_template(template, tokenizer)
    if isinstance(source, Conversation):
        tooled = [t.param for t in turns if t.extra]   # a tool message always has its tool_call_id
        if tools or tooled:
            raise _err("tools" if tools else tooled[0], f"template {source.name!r} cannot show tools or tool "
                       "calls; use the model's own chat template or a --chat-template that can")
        text = _render_conversation(source, turns, add_generation_prompt)
        return RenderedPrompt(text, images, source.stop_str)
    typed = reads_typed_parts(source if source is not None else getattr(tokenizer, "chat_template", None))
    hf_messages = [{"role": t.role, "content": _hf_content(t, typed), **t.extra} for t in turns]
    return RenderedPrompt(_render_jinja(source, hf_messages, tokenizer, add_generation_prompt, tools), images)


def _err(param: str, detail: str) -> ChatTemplateError:
    return ChatTemplateError(f"{param}: {detail}", param=param)


def _parse_messages(messages: object) -> list[_Turn]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise _err("messages", "must be a non-empty list of {role, content} objects")
    return [_parse_turn(msg, f"messages[{i}]") for i, msg in enumerate(messages)]


def _parse_turn(msg: object, at: str) -> _Turn:
    if not isinstance(msg, Mapping):
        raise _err(at, "must be an object with 'role' and 'content'")
    raw_role = msg.get("role")
    role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        expected = "expected system, developer, user, assistant or tool"
        raise _err(f"{at}.role", f"unsupported role {raw_role!r} ({expected})")
    extra = tool_fields(msg, role, at, _err)
    content = msg.get("content")
    if content is None:
        if extra.get("tool_calls"):   # an assistant turn that only called tools
            return _Turn(role, [""], True, at, extra)
        raise _err(f"{at}.content", f"{role} message has no content")
    if isinstance(content, str):
        return _Turn(role, [content], True, at, extra)
    if not isinstance(content, list):
        raise _err(f"{at}.content", "must be a string or a list of content parts")
    parts = [_parse_part(p, role, f"{at}.content[{j}]") for j, p in enumerate(content)]
    return _Turn(role, parts, False, at, extra)


def _parse_part(part: object, role: str, at: str) -> str | ImageRef:
    if not isinstance(part, Mapping):
        raise _err(at, "must be an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _err(f"{at}.text", "must be a string")
        return part["text"]
    if kind not in ("image_url", "image"):
        expected = "expected 'text', 'image_url' or 'image'"
        raise _err(f"{at}.type", f"unsupported content part type {kind!r} ({expected})")
    if role != "user":
        raise _err(f"{at}.type", f"images are only allowed in user messages, not in {role} messages")
    return _parse_image(part, kind, at)


def _parse_image(part: Mapping[str, Any], kind: str, at: str) -> ImageRef:
    if kind == "image_url":
        spec = part.get("image_url")
        spec = {"url": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, Mapping):
            raise _err(f"{at}.image_url", "must be an object with a 'url'")
        url, detail, param = spec.get("url"), spec.get("detail"), f"{at}.image_url.url"
        detail_at = f"{at}.image_url.detail"
        url = url if isinstance(url, str) else None
    else:  # HF style: {"type": "image", "image" | "url" | "path": ...}
        key = next((k for k in ("image", "url", "path") if part.get(k) is not None), "image")
        url, detail, param, detail_at = part.get(key), part.get("detail"), f"{at}.{key}", f"{at}.detail"
    if url is None or (isinstance(url, str) and not url.strip()):
        raise _err(param, "image part has no image URL")
    if detail not in (None, "auto", "low", "high"):
        raise _err(detail_at, f"must be 'auto', 'low' or 'high', not {detail!r}")
    return ImageRef(url, detail or "auto", param)


def _hf_content(turn: _Turn, typed: bool) -> str | list[dict[str, str]]:
    """A turn's content for an HF template: a string, or parts where images are or the template
    reads only parts (`typed`); a tool's text parts joined, as templates print a tool's content."""
    if (turn.plain and not typed) or (turn.role == "tool" and all(isinstance(p, str) for p in turn.parts)):
        return "".join(str(p) for p in turn.parts)
    return [_hf_part(p) for p in turn.parts]


def _hf_part(part: str | ImageRef) -> dict[str, str]:
    return {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"}


def _render_conversation(conv: Conversation, turns: list[_Turn], add_generation_prompt: bool) -> str:
    system_at = None
    for i, turn in enumerate(turns):
        if turn.role != "system":
            conv.append_message(turn.role, conv.format_content(turn.parts))
        elif i == 0:
            conv.system_message, system_at = conv.format_content(turn.parts), f"{turn.param}.role"
        else:
            raise _err(f"{turn.param}.role", f"template {conv.name!r} takes a system message only first")
    if conv.images and system_at is not None and not conv.system_with_images:
        raise _err(system_at, f"template {conv.name!r} takes no system message in a chat with images")
    if add_generation_prompt:
        conv.append_message("assistant", None)
    return conv.get_prompt()


def _resolve_template(template: str | None, tokenizer: Any) -> Conversation | str | None:
    """A Conversation, Jinja source, or None for the tokenizer's own template."""
    if template is None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                "no chat template: pass a template (built-in name, .jinja or .json file) "
                "or a tokenizer that has a chat_template",
                param="chat_template",
            )
        return None
    if template in chat_templates:
        return get_chat_template(template)
    if "{{" in template or "{%" in template:
        return template
    path = Path(template)
    if path.suffix not in (".jinja", ".j2", ".json"):
        return get_chat_template(template)  # raises: unknown name
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else text
    except (OSError, ValueError) as exc:
        raise _err("chat_template", f"cannot load chat template file {template!r}: {exc}") from exc
    if isinstance(data, str):
        return data
    if isinstance(data, Mapping) and isinstance(data.get("chat_template"), str):
        return data["chat_template"]  # an HF chat_template.json
    if not isinstance(data, Mapping):
        raise _err("chat_template", f"{template!r} does not hold a JSON object")
    return Conversation.from_dict(data)


def _render_jinja(source: str | None, messages: list[dict[str, Any]], tokenizer: Any, add_gen: bool,
                  tools: list[dict[str, Any]] | None) -> str:
    try:
        return render_jinja(source, messages, tokenizer, add_gen, tools)
    except jinja2.TemplateError as exc:
        raise _err("chat_template", f"chat template failed: {exc}") from exc
