"""Incremental detokenization with stop strings.

`push(token_id)` returns the text that is now safe to show: it waits while the tail decodes to
an incomplete UTF-8 sequence, and holds back a suffix that could still grow into a stop string.
When a stop string appears, the text is cut before it and `stopped` holds the match.
`finish()` releases whatever was held back.
"""

from __future__ import annotations

from typing import Any


def _raw_decoder(tokenizer: Any):
    """The Rust `tokenizers.Tokenizer.decode` when `tokenizer.decode(ids, skip_special_tokens=s,
    clean_up_tokenization_spaces=False)` is exactly that call (transformers' TokenizersBackend,
    `_decode` not overridden), else None. It skips the wrapper's per-call argument conversion,
    which is half the cost of a decode step's detokenization at large batch."""
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode \
            and isinstance(backend, Tokenizer):
        return backend.decode
    return None


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""          # all decoded text so far (before stop truncation)
        self._emitted = 0       # chars of self.text already returned
        self.stopped: str | None = None
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._raw = _raw_decoder(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._raw is not None:
            return self._raw(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return newly visible text ('' if nothing is safe to show yet)."""
        if self.stopped is not None:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        if self.stop and self.stopped is None:
            # search only where a new match can start
            start = max(0, self._emitted - self._hold)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                cut, self.stopped = min(hits)
                self.text = self.text[:cut]
                final = True
        limit = len(self.text) if final else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted:limit]
        self._emitted = limit
        return out

    def finish(self) -> str:
        """Flush text held back for stop-string matching."""
        return self._release(final=True)
