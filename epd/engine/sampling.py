"""Sampling parameters and the sampler.

`SamplingParams.from_dict` validates user input (unknown keys are an error, not ignored). The
sampler takes the step's logits for the requests that produce a token and gives one token per
row: greedy rows take the argmax (after penalties, `logit_bias` and a structured-output grammar's
mask); the rest go through the same, then temperature, top-k, top-p and min-p, then draw from a
per-request `torch.Generator` when a seed is given, so a seeded request gives the same tokens
whatever else is in the batch. On GPU, unseeded sampled rows are drawn together (`_draw_batch`:
same filters, one multinomial). `sample_on_device` does all of it, and
the logprobs, without a host sync (penalties are dense over the vocabulary, index lists are copied
without waiting), which the engine's overlap schedule needs; `sample` is that plus one copy back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from epd.engine.device_copy import to_device


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
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit) before sampling
    response_format: str | None = None   # structured output spec (epd.engine.structured), None: free text
    cache_salt: str = ""                 # not sampling: requests share cached prefixes only under one salt
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """A penalty reads the request's earlier tokens."""
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the full sampler: the token is the raw argmax."""
        return (self.greedy and not self.penalised and not self.logprobs and not self.logit_bias
                and self.response_format is None)

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
        if isinstance(d.get("response_format"), dict):   # OpenAI's field: checked and made canonical
            from epd.engine.structured import StructuredOutputError, response_format_spec

            try:
                d["response_format"] = response_format_spec(d["response_format"])
            except StructuredOutputError as e:
                raise SamplingParamError(str(e), "response_format") from None
        if "logit_bias" in d:   # {id: bias} or [(id, bias), ...] (as it crosses a process boundary)
            bias = d["logit_bias"] or ()
            pairs = bias.items() if isinstance(bias, dict) else bias
            try:
                d["logit_bias"] = tuple(sorted((int(t), float(b)) for t, b in pairs))
            except (TypeError, ValueError):
                raise SamplingParamError("logit_bias must map token ids to numbers", "logit_bias") from None
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
            ("cache_salt", isinstance(self.cache_salt, str) and len(self.cache_salt) <= 1024,
             "must be a string of at most 1024 characters"),
            ("n", self.n == 1, "only n=1 is supported"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("logit_bias", all(t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias),
             "must map token ids >= 0 to biases in [-100, 100]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamError(f"{name}={getattr(self, name)!r} {why}", name)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    def row(self, i: int) -> tuple[int, float | None, list[tuple[int, float]] | None]:
        """Row i's token, logprob and top logprobs (None where not computed)."""
        return (self.token_ids[i], None if self.logprobs is None else self.logprobs[i],
                None if self.top_logprobs is None else self.top_logprobs[i])


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request producing a token this step."""
    params: SamplingParams
    generator: torch.Generator | None
    seen_ids: list[int]          # prompt + output known on the host, for the repetition penalty
    output_ids: list[int]        # output known on the host, for frequency / presence penalties
    banned_ids: tuple[int, ...]  # EOS/stop ids while min_new_tokens is not reached
    pending: torch.Tensor | None = None   # output tokens still on the device (overlap schedule)
    allowed: torch.Tensor | None = None   # bool [vocab] on the logits' device: a grammar's next tokens


@dataclass
class DeviceSample:
    """One token per row, and the logprobs asked for, on the logits' device."""
    tokens: torch.Tensor                  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32, every row's, when one row asks
    top_ids: torch.Tensor | None = None   # [B, k], k the most top_logprobs a row asks for
    top_vals: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DeviceSample:
        """The same sample with each tensor passed through `fn` (e.g. a copy to host memory)."""
        return DeviceSample(*(None if t is None else fn(t)
                              for t in (self.tokens, self.logprobs, self.top_ids, self.top_vals)))

    def result(self, params: list[SamplingParams]) -> SampleResult:
        """As Python values, each row's top logprobs cut to the count it asked for."""
        result = SampleResult(self.tokens.tolist())
        if self.logprobs is not None:
            result.logprobs = self.logprobs.tolist()
        if self.top_ids is not None:
            ids, vals = self.top_ids.tolist(), self.top_vals.tolist()
            result.top_logprobs = [list(zip(ids[i][:p.top_logprobs], vals[i][:p.top_logprobs], strict=True))
                                   for i, p in enumerate(params)]
        return result


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
    """logits: [B, V] float32 -> one token per row, on the host."""
    return sample_on_device(logits, rows).result([r.params for r in rows])


def sample_on_device(logits: torch.Tensor, rows: list[SamplingRow]) -> DeviceSample:
    """The sampler without a host sync: penalties and bans from index tensors the host copies
    without waiting (plus `pending`, tokens only the device knows yet), greedy rows' argmax,
    unseeded draws batched on GPU, seeded ones from their own generator."""
    raw = logits
    if any(r.banned_ids or r.params.penalised or r.params.logit_bias or r.allowed is not None for r in rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            _apply_penalties(logits[i], row)
            if row.params.logit_bias:
                ids, bias = zip(*row.params.logit_bias, strict=True)
                bias_values = to_device(bias, logits.device, logits.dtype)
                logits[i].index_add_(0, _ids(list(ids), None, logits.device), bias_values)
            if row.banned_ids:
                logits[i].index_fill_(0, _ids(list(row.banned_ids), None, logits.device), float("-inf"))
            if row.allowed is not None:
                logits[i].masked_fill_(~row.allowed, float("-inf"))
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    batched = [i for i in drawn if rows[i].generator is None] if logits.is_cuda else []
    if batched:  # one set of kernels for all unseeded rows
        index = _ids(batched, None, logits.device)
        tokens.index_copy_(0, index, _draw_batch(logits.index_select(0, index), [rows[i].params for i in batched]))
    for i in drawn:
        if i not in batched:
            tokens[i:i + 1] = _draw(logits[i], rows[i].params, rows[i].generator)
    out = DeviceSample(tokens)
    if any(r.params.logprobs for r in rows):
        lp = torch.log_softmax(raw, dim=-1)
        out.logprobs = lp.gather(1, tokens.unsqueeze(1)).squeeze(1)
        k = max(r.params.top_logprobs for r in rows)
        if k:
            out.top_vals, out.top_ids = lp.topk(k, dim=-1)
    return out


def _ids(host: list[int], pending: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """int64 ids on `device` from a host list (copied without waiting for the device) and the
    device-side `pending` ids."""
    ids = to_device(host, device, torch.long)
    return ids if pending is None else torch.cat([ids, pending.to(torch.long)])


def _apply_penalties(row_logits: torch.Tensor, row: SamplingRow) -> None:
    """Dense over the vocabulary, so that no op's size depends on the device's data (no sync)."""
    p, pending = row.params, row.pending
    n_pending = 0 if pending is None else pending.numel()
    if p.repetition_penalty != 1.0 and len(row.seen_ids) + n_pending:
        seen = torch.zeros_like(row_logits, dtype=torch.bool)
        seen.index_fill_(0, _ids(row.seen_ids, pending, row_logits.device), True)
        rp = p.repetition_penalty
        row_logits.copy_(torch.where(seen, torch.where(row_logits > 0, row_logits / rp, row_logits * rp), row_logits))
    if (p.frequency_penalty or p.presence_penalty) and len(row.output_ids) + n_pending:
        out = _ids(row.output_ids, pending, row_logits.device)
        counts = torch.zeros_like(row_logits).index_add_(0, out, torch.ones(out.shape, dtype=row_logits.dtype,
                                                                           device=row_logits.device))
        row_logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row_logits.dtype)


def _draw_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`_draw` for several rows at once (same filters, in the same order); logits: [n, V]."""
    def col(values: list[float]) -> torch.Tensor:
        return to_device(values, logits.device, logits.dtype).unsqueeze(1)

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
