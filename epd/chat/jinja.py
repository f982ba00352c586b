"""Rendering an HF-style Jinja chat template (the tokenizer's own, a file, or inline source).

With a tokenizer, its `apply_chat_template` renders (BOS / EOS text and the template's own
helpers as transformers gives them); without one, a sandboxed environment in the HF dialect does.
`tools` (OpenAI's `tools`, as function specs) go to the template, which may show them to the model
or not: that is the template's choice, as in transformers and vLLM.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The HF chat-template dialect: sandboxed, trimmed blocks, loop controls, tojson, raise_exception."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def render_jinja(source: str | None, messages: list[dict[str, Any]], tokenizer: Any, add_gen: bool,
                 tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text; raises jinja2.TemplateError when the template fails (or raises)."""
    if tokenizer is not None:
        return str(tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                 add_generation_prompt=add_gen, tools=tools or None))
    # Without a tokenizer there is no BOS / EOS text to give the template.
    template = _jinja_env().from_string(source or "")
    return template.render(messages=messages, add_generation_prompt=add_gen, bos_token="", eos_token="",
                           tools=tools or None, documents=None)
