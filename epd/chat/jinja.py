"""Rendering an HF-style Jinja chat template (the tokenizer's own, a file, or inline source).

With a tokenizer, its `apply_chat_template` renders (BOS / EOS text and the template's own
helpers as transformers gives them); without one, a sandboxed environment in the HF dialect does.
`tools` (OpenAI's `tools`, as function specs) go to the template, which may show them to the model
or not: that is the template's choice, as in transformers and vLLM.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's tokens with it):
    renders its body, as transformers does when it is not asked for the marks."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


# A template that reads a message's content as typed parts (LLaVA's: `selectattr('type', ...)`,
# `content['type']`) renders a plain string as nothing: such a template gets a text part instead.
_TYPED_PARTS = re.compile(r"""selectattr\(\s*['"]type['"]|\[\s*['"]type['"]\s*\]|\.type\b""")


def reads_typed_parts(source: str | None) -> bool:
    return bool(source) and _TYPED_PARTS.search(source) is not None


def _with_bos(text: str, tokenizer: Any) -> str:
    """transformers' processor rule: a tokenizer that starts every text with BOS (Llama's) gets it in
    front of a rendered prompt that does not start with it (LLaVA's templates write none)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or text.startswith(bos):
        return text
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos + text if ids and ids[0] == tokenizer.bos_token_id else text


@functools.cache
def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The HF chat-template dialect: sandboxed, trimmed blocks, loop controls, `generation` blocks,
    tojson, raise_exception."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationBlock]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def render_jinja(source: str | None, messages: list[dict[str, Any]], tokenizer: Any, add_gen: bool,
                 tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text; raises jinja2.TemplateError when the template fails (or raises)."""
    if tokenizer is not None:
        text = str(tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                 add_generation_prompt=add_gen, tools=tools or None))
        return _with_bos(text, tokenizer)
    # Without a tokenizer there is no BOS / EOS text to give the template.
    template = _jinja_env().from_string(source or "")
    return template.render(messages=messages, add_generation_prompt=add_gen, bos_token="", eos_token="",
                           tools=tools or None, documents=None)
