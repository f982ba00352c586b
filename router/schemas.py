"""Pydantic models of the OpenAI requests the router accepts.

Unknown fields are accepted and ignored (OpenAI clients send fields such as `user`, `store` or
`metadata` that change nothing here). Fields that would change the result in a way this server
cannot honour are refused with a 400 naming the field (`unsupported()`): legacy `functions`, audio
output, echo with logprobs, suffix, best_of, a `response_format` xgrammar cannot follow (or any but text
without it).
`n` (up to 128, as OpenAI) choices are `n` backend requests (`router.choices`).

Lifecycle: the app validates the JSON body into `ChatCompletionRequest` / `CompletionRequest`
(a `ValidationError` becomes a 400 naming the field), calls `unsupported()`, for a chat request
`tool_plan(parser)` (`router.tool_calls`), then `sampling_dict(max_new_tokens)` for
`SamplingParams.from_dict`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from epd.engine.structured import StructuredOutputError, response_format_spec
from router.tool_calls import ToolChoice, ToolRequestError, guided_format, parse_tool_choice, parse_tools

_SEED_RANGE = dict(ge=-(1 << 63), le=(1 << 64) - 1)   # what torch.Generator.manual_seed takes


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's: usage (so far) on every chunk too


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints (OpenAI's, then vLLM's extensions)."""

    model_config = ConfigDict(extra="allow")
    _format_spec: str | None = PrivateAttr(None)   # response_format as epd.engine.structured's spec (unsupported())

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # sampling bounds are checked once, by epd.engine.sampling.SamplingParams (a 400 naming the field)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **_SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None   # token id (a JSON key, so a string) -> bias in [-100, 100]
    response_format: dict[str, Any] | None = None   # text, json_object or json_schema (epd.engine.structured)
    # extensions (vLLM / SGLang names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False
    include_stop_str_in_output: bool = False   # vLLM's: the matched stop string ends the text
    cache_salt: str | None = None   # vLLM's: requests share cached prefixes only under the same salt
    mm_processor_kwargs: dict[str, Any] | None = None   # vLLM's; refused (the checkpoint's preprocessor config decides)

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"key {key!r} is not a token id")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"bias {value} for token {key} is outside [-100, 100]")
        return bias

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(max tokens asked for, the field that asked)."""
        return self.max_tokens, "max_tokens"

    def bias_token_ids(self) -> list[int]:
        return [int(key) for key in self.logit_bias or {}]

    def _common_unsupported(self) -> tuple[str, str] | None:
        if self.mm_processor_kwargs:
            return "mm_processor_kwargs", ("per-request image processor settings are not supported: the checkpoint's "
                                           "preprocessor_config.json decides (min_pixels / max_pixels for Qwen2-VL)")
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        try:
            self._format_spec = response_format_spec(self.response_format)
        except StructuredOutputError as e:
            return "response_format", str(e)
        return None

    def sampling_dict(self, max_new_tokens: int) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": max_new_tokens, "min_new_tokens": self.min_tokens,
                               "ignore_eos": self.ignore_eos, "skip_special_tokens": self.skip_special_tokens}
        optional = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p, "seed": self.seed,
                    "repetition_penalty": self.repetition_penalty, "frequency_penalty": self.frequency_penalty,
                    "presence_penalty": self.presence_penalty}
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.top_k is not None:
            out["top_k"] = -1 if self.top_k == 0 else self.top_k      # 0 and -1 both mean "off"
        if self.stop:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.cache_salt is not None:
            out["cache_salt"] = self.cache_salt
        if self.logit_bias:
            out["logit_bias"] = dict(zip(self.bias_token_ids(), self.logit_bias.values(), strict=True))
        if self._format_spec is not None:
            out["response_format"] = self._format_spec
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_SamplingFields):
    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    chat_template: str | None = None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field this server cannot honour, else None."""
        constrained = self.tools and (self.tool_choice == "required" or isinstance(self.tool_choice, dict))
        if constrained and (self.response_format or {}).get("type", "text") != "text":
            return "response_format", "response_format cannot go with a required or named tool_choice"
        common = self._common_unsupported()
        if common:
            return common
        if self.functions:
            return "functions", "function calling is not supported by this server"
        if self.audio is not None or any(m != "text" for m in self.modalities or []):
            return "modalities", "only text output is supported"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true"
        if self.chat_template is not None:
            return "chat_template", "a per-request chat_template is not accepted; the operator sets --chat-template"
        return None

    def tool_plan(self, parser: str | None) -> tuple[list[dict[str, Any]] | None, ToolChoice | None]:
        """(tools for the chat template, the tool choice unless "none"); a named or required choice
        constrains the answer as a response_format would. ToolRequestError names the field."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise ToolRequestError("tool_choice needs tools", "tool_choice")
            return None, None
        tools = parse_tools(self.tools)
        choice = parse_tool_choice(self.tool_choice, tools, parser)
        guided = guided_format(choice, tools, single=self.parallel_tool_calls is False)
        if guided is not None:
            if self._format_spec is not None:
                raise ToolRequestError("response_format cannot go with a required or named tool_choice",
                                       "response_format")
            try:
                self._format_spec = response_format_spec(guided)
            except StructuredOutputError as e:
                raise ToolRequestError(str(e), "tool_choice") from None
        return tools, choice if choice.mode != "none" else None

    def sampling_dict(self, max_new_tokens: int) -> dict[str, Any]:
        out = super().sampling_dict(max_new_tokens)
        if self.logprobs:
            out.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        return out


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (a batch of several is refused in `unsupported`)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]

    def unsupported(self) -> tuple[str, str] | None:
        common = self._common_unsupported()
        if common:
            return common
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list) and len(p) != 1:
            return "prompt", f"a batch of {len(p)} prompts is not supported; send one prompt per request"
        if self.echo and self.logprobs is not None:
            return "echo", "echo with logprobs is not supported (it needs the prompt's logprobs)"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of > 1 is not supported"
        return None

    def sampling_dict(self, max_new_tokens: int) -> dict[str, Any]:
        out = super().sampling_dict(max_new_tokens)
        if self.logprobs is not None:
            out.update(logprobs=True, top_logprobs=self.logprobs)
        return out


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: a completion `prompt` or chat `messages` (images expanded to their tokens)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    tools: list[Any] | None = None   # with messages: shown to the chat template, as in a chat request

    def unsupported(self) -> tuple[str, str] | None:
        if (self.prompt is None) == (self.messages is None):
            return "prompt", "give exactly one of prompt or messages"
        return None

    def template_tools(self) -> list[dict[str, Any]] | None:
        return parse_tools(self.tools) if self.tools else None


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize: token ids back to text."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int]

    def unsupported(self) -> tuple[str, str] | None:
        return None
