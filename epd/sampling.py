"""Sampling parameters and the sampler.

`SamplingParams.from_dict` validates user input (unknown keys are an error, not ignored). The
sampler takes the step's logits for the requests that produce a token and returns one token per
row: greedy rows take the argmax; the rest go through penalties, temperature, top-k, top-p and
min-p, then draw from a per-request `torch.Generator` when a seed is given, so a seeded request
gives the same tokens whatever else is in the batch. On GPU, unseeded sampled rows are drawn
together (`_draw_batch`: same filters, one multinomial), so a step has no host sync per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


class SamplingParamError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    n: int = 1
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the full sampler: the token is the raw argmax."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.frequency_penalty
                and not self.presence_penalty and not self.logprobs)

    @property
    def on_device(self) -> bool:
        """The token needs nothing from the host: no penalties (they read the request's past
        tokens). The overlap schedule samples such rows ahead (`sample_tokens`, logprobs too)."""
        return self.repetition_penalty == 1.0 and not self.frequency_penalty and not self.presence_penalty

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        if isinstance(d, SamplingParams):
            return d
        d = dict(d or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SamplingParamError(f"unknown sampling parameter(s): {', '.join(unknown)}", unknown[0])
        if isinstance(d.get("stop"), str):
            d["stop"] = (d["stop"],)
        for key in ("stop", "stop_token_ids"):
            if key in d:
                d[key] = tuple(d[key] or ())
        params = cls(**d)
        params.validate()
        return params

    def validate(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens, "must be in [0, max_new_tokens]"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, "must be -1 (off) or >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in [0, 20]"),
            ("n", self.n == 1, "only n=1 is supported"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamError(f"{name}={getattr(self, name)!r} {why}", name)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request producing a token this step."""
    params: SamplingParams
    generator: torch.Generator | None
    seen_ids: list[int]          # prompt + output, for the repetition penalty
    output_ids: list[int]
    banned_ids: tuple[int, ...]  # EOS/stop ids while min_new_tokens is not reached


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
    """logits: [B, V] float32 -> one token per row."""
    raw = logits
    logits = logits.clone()
    for i, row in enumerate(rows):
        _apply_penalties(logits[i], row)
        if row.banned_ids:
            logits[i, list(row.banned_ids)] = float("-inf")
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    batched = [i for i in drawn if rows[i].generator is None] if logits.is_cuda else []
    if batched:  # one set of kernels for all unseeded rows, no host sync per row
        tokens[batched] = _draw_batch(logits[batched], [rows[i].params for i in batched])
    for i in drawn:
        if i not in batched:
            tokens[i:i + 1] = _draw(logits[i], rows[i].params, rows[i].generator)
    result = SampleResult(tokens.tolist())
    if any(r.params.logprobs for r in rows):
        lp = torch.log_softmax(raw, dim=-1)
        result.logprobs = lp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        k = max(r.params.top_logprobs for r in rows)
        if k:
            vals, idx = lp.topk(k, dim=-1)
            result.top_logprobs = [list(zip(idx[i, :r.params.top_logprobs].tolist(),
                                            vals[i, :r.params.top_logprobs].tolist(), strict=True))
                                   for i, r in enumerate(rows)]
    return result


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row, left on the logits' device with no host sync, for rows whose params are
    `on_device`: the argmax for greedy rows, one batched draw (`_draw_batch`) for unseeded ones,
    and each seeded row from its own generator, as `sample` draws them."""
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy and generators[i] is None]
    if drawn:
        rows = torch.tensor(drawn).to(logits.device, non_blocking=True)
        tokens.index_copy_(0, rows, _draw_batch(logits.index_select(0, rows), [params[i] for i in drawn]))
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy and gen is not None:
            tokens[i:i + 1] = _draw(logits[i], p, gen)
    return tokens


def _apply_penalties(row_logits: torch.Tensor, row: SamplingRow) -> None:
    p = row.params
    if p.repetition_penalty != 1.0 and row.seen_ids:
        ids = torch.tensor(sorted(set(row.seen_ids)), device=row_logits.device)
        vals = row_logits[ids]
        row_logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and row.output_ids:
        ids, counts = torch.tensor(row.output_ids, device=row_logits.device).unique(return_counts=True)
        row_logits[ids] -= p.frequency_penalty * counts.to(row_logits.dtype) + p.presence_penalty


def _draw_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`_draw` for several rows at once (same filters, in the same order); logits: [n, V]."""
    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype).to(logits.device, non_blocking=True).unsqueeze(1)

    probs = torch.softmax(logits / col([p.temperature for p in params]), dim=-1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        vocab = probs.shape[-1]
        k = col([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]).long()
        kth = sorted_p.gather(1, k - 1)
        sorted_p = torch.where(sorted_p >= kth, sorted_p, 0.0)   # ties with the k-th stay, as in _draw
        drop = sorted_p.cumsum(-1) - sorted_p > col([p.top_p for p in params])
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
    if any(p.min_p > 0.0 for p in params):
        floor = col([p.min_p for p in params]) * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs >= floor, probs, 0.0)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1).squeeze(1)


def _draw(row_logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """One row's token as a 1-element tensor on the logits' device (no host sync)."""
    probs = torch.softmax(row_logits / p.temperature, dim=-1)
    if p.top_k > 0:
        kth = probs.topk(min(p.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > p.top_p   # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    return torch.multinomial(probs / probs.sum(), 1, generator=gen)
