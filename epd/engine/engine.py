"""The offline `Engine`: the whole pipeline (encode, prefill, decode) in one process.

    from epd import Engine
    llm = Engine(model_path=DIR, chat_template=None, device="cpu")
    out = llm.generate(prompt=text, image_data=[img], sampling_params={"max_new_tokens": 16, "temperature": 0})
    out["text"], out["output_ids"], out["meta_info"]
    llm.generate(prompt=[t1, t2], image_data=[[img], []])     # a batch: a list of outputs
    llm.shutdown()

All inputs of a call are validated before anything is queued; a failure in the middle of a run
aborts the call's requests, so their KV pages go back to the pool.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from epd.config import load_tokenizer
from epd.engine.engine_core import EngineConfig, EngineCore
from epd.engine.request import Request, TokenEvent
from epd.engine.sampling import SamplingParams


class Engine:
    def __init__(self, model_path: str, chat_template: str | None = None, device: str | None = None,
                 **engine_kwargs: Any) -> None:
        self.tokenizer = load_tokenizer(model_path)
        self.chat_template = chat_template
        self.core = EngineCore(EngineConfig(model_path=model_path, device=device, **engine_kwargs), self.tokenizer)

    # ---- public API -------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, input_ids: list | None = None,
                 image_data: list | None = None, sampling_params: dict | list | None = None,
                 stream: bool = False) -> Any:
        batch = isinstance(prompt, list) or (input_ids is not None and input_ids and isinstance(input_ids[0], list))
        if not batch:
            reqs = [self._make_request(prompt, input_ids, image_data, sampling_params)]
            return self._stream(reqs[0]) if stream else self._run(reqs)[0]
        if stream:
            raise ValueError("stream=True takes a single prompt")
        n = len(prompt) if prompt is not None else len(input_ids or [])
        images = image_data if image_data is not None else [None] * n
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        if len(images) != n or len(params) != n:
            raise ValueError(f"batch of {n} prompts needs {n} image_data and sampling_params entries")
        reqs = [self._make_request(prompt[i] if prompt is not None else None,
                                   input_ids[i] if input_ids is not None else None, images[i], params[i])
                for i in range(n)]
        return self._run(reqs)

    def chat(self, messages: list[dict], sampling_params: dict | None = None) -> dict:
        """Apply the chat template (the tokenizer's, or `chat_template`) and generate."""
        from epd.chat.conversation import render_messages

        rendered = render_messages(messages, tokenizer=self.tokenizer, template=self.chat_template)
        images = [ref.url for ref in rendered.images]
        return self.generate(prompt=rendered.text, image_data=images or None, sampling_params=sampling_params)

    def abort(self, rid: str) -> bool:
        return self.core.abort(rid)

    def check_integrity(self) -> None:
        """Raise if the KV page pool is not intact (free + in use == total, owners consistent)."""
        self.core.check_integrity()

    def shutdown(self) -> None:
        self.core.flush()
        for req in list(self.core.scheduler.running) + list(self.core.scheduler.waiting):
            self.core.abort(req.rid)
        self.core.check_integrity()
        self.core.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals --------------------------------------------------------------------------
    def _make_request(self, prompt, input_ids, image_data, sampling_params) -> Request:
        params = SamplingParams.from_dict(sampling_params)
        inp = self.core.inputs.process(prompt=prompt, input_ids=input_ids, image_data=image_data)
        return self.core.new_request(inp, params)

    def _run(self, reqs: list[Request]) -> list[dict]:
        pending = {r.rid for r in reqs}
        try:
            for r in reqs:
                self.core.add(r)
            while pending:
                for ev in self.core.step():
                    if ev.finished:
                        pending.discard(ev.rid)
            self.core.flush()   # a step launched before the last token was seen computed nothing kept
        except BaseException:
            for rid in pending:
                self.core.abort(rid)
            raise
        return [_output(r) for r in reqs]

    def _stream(self, req: Request) -> Iterator[dict]:
        self.core.add(req)
        finished = False
        try:
            while not finished:
                for ev in self.core.step():
                    if ev.rid == req.rid:
                        finished = ev.finished
                        yield _chunk(req, ev)
        finally:
            if not finished:
                self.core.abort(req.rid)
            self.core.flush()


def _meta(req: Request) -> dict:
    return {
        "id": req.rid,
        "prompt_tokens": req.prompt_len,
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "finish_reason": req.finish_reason,
        "e2e_latency": time.monotonic() - req.created,
        "output_token_logprobs": req.output_logprobs or None,
    }


def _output(req: Request) -> dict:
    return {"text": req.detok.text, "output_ids": list(req.output_ids), "meta_info": _meta(req)}


def _chunk(req: Request, ev: TokenEvent) -> dict:
    return {"text": ev.text, "token_id": ev.token_id, "finished": ev.finished,
            "meta_info": {**_meta(req), "completion_tokens": ev.completion_tokens}}
