"""From a validated OpenAI request to what the backend takes: token ids plus images.

Lifecycle of a chat request in `PromptBuilder.chat`:
1. render `messages` with the chat template (`--chat-template` NAME|FILE, else the tokenizer's);
2. count the images against `--limit-mm-per-prompt` (a 400 before anything is fetched), then fetch
   every image concurrently with `aprobe_image` and the server-safe settings (no local files unless
   under `--allowed-local-media-path`, link-local / metadata hosts refused, `--allowed-media-domains`),
   each read up to its header on the builder's decoder pool (`decode_threads` at once, over all
   requests): format, size (EXIF orientation applied) checked and reserved from the request's
   `PixelBudget`. No pixel is decoded here: the node that runs the vision tower (or the local
   backend) decodes the bytes, held to the size read here. The first failure cancels the other
   fetches and becomes a 400 naming the message part;
3. tokenize and expand each image placeholder to the image's token count (the layout comes from
   the image size alone; pixels are left to the backend), in a worker thread: the request's
   `ProcessedInput`, which the backend takes as it is (nothing is tokenized twice);
4. check the context: a prompt that leaves no room, or prompt + max_tokens over the context, is
   a 400 with vLLM's wording; an absent max_tokens becomes the remaining context.
A text completion skips steps 1-2.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from epd.chat.conversation import ChatTemplateError, ImageRef, render_messages
from epd.config import ModelConfig, load_tokenizer
from epd.engine.inputs import InputProcessor, ProcessedInput, outside_vocabulary
from epd.media.encoded import EncodedImage, aprobe_image
from epd.media.loading import MediaError, MediaLimits, PixelBudget
from router.openai_format import APIError

_UNLIMITED = 1 << 62     # the context check is done here, with the client-facing wording


def check_chat_template(model_path: str, template: str | None) -> None:
    """Render a one-message chat, so a bad --chat-template fails at start-up (before the model
    loads), not on every request. Raises ChatTemplateError."""
    tokenizer = load_tokenizer(model_path)
    render_messages([{"role": "user", "content": "hi"}], tokenizer=tokenizer, template=template)


@dataclass(frozen=True)
class Prepared:
    inp: ProcessedInput              # tokenized, expanded, image layouts: what the backend runs
    images: list[EncodedImage]       # checked from their headers; decoded where their pixels are needed
    stop: tuple[str, ...] = ()       # stop strings of a built-in chat template

    @property
    def input_ids(self) -> list[int]:
        return self.inp.input_ids

    @property
    def image_tokens(self) -> int:
        return sum(im.num_tokens for im in self.inp.images)


class PromptBuilder:
    def __init__(self, model_path: str, max_context: int | Callable[[], int], chat_template: str | None = None,
                 allowed_local_media_path: str | None = None, media_limits: MediaLimits | None = None) -> None:
        self.tokenizer = load_tokenizer(model_path)
        self.config = ModelConfig.from_pretrained(model_path)
        self._max_context = max_context
        self.chat_template = chat_template
        self.allowed_dir = allowed_local_media_path
        self.limits = media_limits or MediaLimits()
        self.inputs = InputProcessor(self.config, self.tokenizer, _UNLIMITED, with_pixels=False, image_keys=False,
                                     limits=self.limits)
        self._lock = threading.Lock()      # one tokenizer, several worker threads
        self._http: httpx.AsyncClient | None = None
        self._decoder: ThreadPoolExecutor | None = None   # shared by every request: reads the headers

    @property
    def max_context(self) -> int:
        """The backend's context now (over node pools: the smallest the nodes publish)."""
        return self._max_context() if callable(self._max_context) else self._max_context

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._decoder = None

    # ---- the two kinds of request ---------------------------------------------------------------
    async def chat(self, messages: list[Any], check_context: bool = True,
                   tools: list[dict[str, Any]] | None = None) -> Prepared:
        try:
            rendered = await asyncio.to_thread(self._render, messages, tools)
        except ChatTemplateError as e:
            raise APIError(400, str(e), e.param) from None
        images = await self._fetch(rendered.images)
        inp = await asyncio.to_thread(self._process, rendered.text, None, images, "messages")
        if check_context:
            self._check_prompt(len(inp.input_ids), "messages")
        return Prepared(inp, images, rendered.stop)

    async def completion(self, prompt: str | list[int], check_context: bool = True) -> Prepared:
        text, given = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        inp = await asyncio.to_thread(self._process, text, given, [], "prompt")
        if check_context:
            self._check_prompt(len(inp.input_ids), "prompt")
        return Prepared(inp, [])

    async def detokenize(self, ids: list[int]) -> str:
        self.check_token_ids(ids, "tokens")

        def decode() -> str:
            with self._lock:
                return self.tokenizer.decode(ids)
        return await asyncio.to_thread(decode)

    def max_new_tokens(self, prompt_tokens: int, requested: int | None, field: str, where: str) -> int:
        """The request's token budget: as asked if it fits the context, else the remaining context."""
        if requested is None:
            return self.max_context - prompt_tokens
        if prompt_tokens + requested > self.max_context:
            raise APIError(400, f"This model's maximum context length is {self.max_context} tokens. However, you "
                                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the {where}, "
                                f"{requested} in the completion). Please reduce the length of the {where} or "
                                f"completion.", field, "context_length_exceeded")
        return requested

    def check_token_ids(self, ids: list[int] | None, field: str) -> None:
        why = outside_vocabulary(ids or [], self.config.text.prompt_vocab_size)
        if why is not None:
            raise APIError(400, f"{field}: {why}", field)

    # ---- steps ----------------------------------------------------------------------------------
    def _render(self, messages: list[Any], tools: list[dict[str, Any]] | None = None) -> Any:
        with self._lock:
            return render_messages(messages, tokenizer=self.tokenizer, template=self.chat_template, tools=tools)

    def _process(self, text: str | None, ids: list[int] | None, images: list[EncodedImage],
                 where: str) -> ProcessedInput:
        try:
            with self._lock:
                return self.inputs.process(prompt=text, input_ids=ids, image_data=images or None)
        except ValueError as e:    # InputError: empty prompt, placeholders vs images, bad token id
            raise APIError(400, f"{where}: {e}", where) from None

    def _check_prompt(self, prompt_tokens: int, where: str) -> None:
        if prompt_tokens >= self.max_context:
            raise APIError(400, f"This model's maximum context length is {self.max_context} tokens. However, your "
                                f"request has {prompt_tokens} input tokens (text and images) and at least one "
                                f"token must be left to generate. Please reduce the length of the {where}.",
                           where, "context_length_exceeded")

    async def _fetch(self, refs: list[ImageRef]) -> list[EncodedImage]:
        if not refs:
            return []
        limit = self.limits.max_images
        if len(refs) > limit:
            raise APIError(400, f"At most {limit} image(s) may be provided in one prompt; this request has "
                                f"{len(refs)}. Set `--limit-mm-per-prompt` to increase this limit.", refs[limit].param)
        if self._http is None:
            self._http = httpx.AsyncClient()
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(self.limits.decode_threads, thread_name_prefix="epd-decode")
        budget = PixelBudget(self.limits.max_request_pixels)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._load(ref, i, budget)) for i, ref in enumerate(refs)]
        except ExceptionGroup as eg:
            bad = [e for e in eg.exceptions if isinstance(e, MediaError)]
            if bad:
                raise APIError(400, f"{bad[0]} (at {bad[0].param})", bad[0].param, "invalid_image") from None
            raise
        return [t.result() for t in tasks]

    async def _load(self, ref: ImageRef, index: int, budget: PixelBudget) -> EncodedImage:
        if isinstance(ref.url, str):
            return await aprobe_image(ref.url, allowed_local_dir=self.allowed_dir, allow_any_local=False,
                                      limits=self.limits, index=index, param=ref.param, client=self._http,
                                      budget=budget, decoder=self._decoder)
        raise MediaError(f"image {index + 1}: give an image as a URL, data URI or (where allowed) a file path",
                         index=index, param=ref.param)
