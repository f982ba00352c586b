"""Structured output (OpenAI's `response_format`): sampling constrained by a grammar, via xgrammar.

A request's `SamplingParams.response_format` is a canonical JSON string, `{"type": "json_object"}`
or `{"type": "json_schema", "schema": {...}}` (`response_format_spec` makes it from the OpenAI
field and checks the schema). The engine compiles it once per distinct spec (`Grammars`, one per
engine: the tokenizer's vocabulary is indexed once) and gives the request a `Constraint`: before
each of its tokens the sampler masks every token the grammar does not allow next (`allowed`), and
the token drawn is fed back (`accept`). The next mask needs that token on the host, so a step with
a constrained request is not overlapped with the next (`EngineCore`). JSON is generated compact
(no free whitespace), so a model cannot fill its budget with blanks; once the value is complete
only the stop tokens are allowed.

xgrammar is optional (`pip install xgrammar`); without it a `response_format` other than text is
refused with a clear error. It is imported on first use (it takes seconds: Triton, TVM FFI), so
processes that never see a structured request never load it.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import torch

from epd.engine.device_copy import to_device

TYPES = ("json_object", "json_schema")


class StructuredOutputError(ValueError):
    pass


@functools.cache
def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise StructuredOutputError("response_format json_object / json_schema needs the xgrammar package") from None
    return xgrammar


def response_format_spec(response_format: dict[str, Any] | None) -> str | None:
    """The OpenAI `response_format` as the canonical spec string (None for plain text). Raises
    StructuredOutputError for an unknown type, a missing schema, a schema xgrammar cannot follow,
    or when xgrammar is not installed."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind not in TYPES:
        raise StructuredOutputError(f"response_format type {kind!r} is not one of text, {', '.join(TYPES)}")
    spec: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise StructuredOutputError("response_format.json_schema.schema must be a JSON Schema object")
        spec["schema"] = schema
    text = json.dumps(spec, separators=(",", ":"))   # key order kept: properties come out in schema order
    check_spec(text)
    return text


def check_spec(spec: str) -> None:
    """Raise StructuredOutputError unless xgrammar can build the spec's grammar."""
    xgr = _xgrammar()
    try:
        xgr.Grammar.from_json_schema(_schema_text(spec), any_whitespace=False)
    except Exception as e:  # noqa: BLE001 - xgrammar raises several kinds for a bad schema
        raise StructuredOutputError(f"response_format: the JSON schema cannot be used: {e}") from None


def _schema_text(spec: str) -> str:
    parsed = json.loads(spec)
    return json.dumps(parsed.get("schema", {"type": "object"}))


class Constraint:
    """One request's grammar state: the tokens allowed next, and the tokens taken."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._bitmask = _xgrammar().allocate_token_bitmask(1, vocab_size)
        self._bits = torch.arange(32, dtype=torch.int32)
        self.vocab_size = vocab_size

    def allowed(self, device: torch.device) -> torch.Tensor:
        """bool [vocab]: the tokens the grammar allows next (only stop tokens once it is complete)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        words = self._bitmask[0]
        bits = (words[:, None] >> self._bits) & 1              # [words, 32], bit k of word w: token 32 w + k
        return to_device(bits.reshape(-1)[:self.vocab_size].bool(), device)

    def accept(self, token_id: int) -> None:
        if not self._matcher.is_terminated():
            self._matcher.accept_token(token_id)


class Grammars:
    """Compiles specs for one tokenizer and vocabulary (compiled grammars are cached by spec)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info)
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.vocab_size = vocab_size

    def constraint(self, spec: str) -> Constraint:
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is None:
                try:
                    compiled = self._compiler.compile_json_schema(_schema_text(spec), any_whitespace=False)
                except Exception as e:  # noqa: BLE001 - a schema the router did not check (Engine API)
                    raise StructuredOutputError(f"response_format: the JSON schema cannot be used: {e}") from None
                self._compiled[spec] = compiled
        return Constraint(_xgrammar().GrammarMatcher(compiled), self.vocab_size)
