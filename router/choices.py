"""The `n` choices of one OpenAI request as one stream of (choice index, event).

Each choice is its own backend request (`BackendRequest` with rid `{rid}-{i}`, and seed + i when a
seed is given, so the choices differ as in vLLM and choice 0 equals the same request with n = 1).
`ChoiceStream(generators)` reads them: choice 0 first, the others once choice 0's first token is
in (its prompt's KV pages are then in the prefix cache, and its images encoded, so the other
choices take them instead of computing the prompt again; the request's time to first token is
choice 0's either way). `next()` returns the next event of whichever choice has one, in arrival
order, and raises the first `BackendError` any of them raises (the request then fails as a
whole); `aclose()` stops every choice still running, which aborts it in the backend and frees its
KV pages. One choice is read directly, without a task.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from router.backend import BackendError, BackendEvent, BackendRequest

_SEED_SPAN = 1 << 64     # seeds are taken modulo this (what torch.Generator.manual_seed accepts)


def choice_requests(breq: BackendRequest, n: int) -> list[BackendRequest]:
    """One backend request per choice: the request itself when n == 1."""
    if n == 1:
        return [breq]
    seed = breq.params.seed
    return [dataclasses.replace(breq, rid=f"{breq.rid}-{i}",
                                params=breq.params if seed is None else
                                dataclasses.replace(breq.params, seed=(seed + i) % _SEED_SPAN))
            for i in range(n)]


class ChoiceStream:
    def __init__(self, generators: list[AsyncIterator[BackendEvent]]) -> None:
        self.n = len(generators)
        self._generators = generators
        self._queue: asyncio.Queue[tuple[int, BackendEvent | None, BaseException | None]] = asyncio.Queue()
        self._tasks = [asyncio.ensure_future(self._pump(0, generators[0]))] if self.n > 1 else []

    def _start_the_others(self) -> None:
        self._tasks += [asyncio.ensure_future(self._pump(i, g)) for i, g in enumerate(self._generators) if i]

    async def _pump(self, index: int, events: AsyncIterator[BackendEvent]) -> None:
        try:
            async for ev in events:
                await self._queue.put((index, ev, None))
                if index == 0 and len(self._tasks) == 1:
                    self._start_the_others()
                if ev.finished:
                    return
            await self._queue.put((index, None, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            await self._queue.put((index, None, e))

    async def next(self) -> tuple[int, BackendEvent]:
        if self.n == 1:
            try:
                return 0, await anext(self._generators[0])
            except StopAsyncIteration:
                raise _ended() from None
        index, ev, error = await self._queue.get()
        if error is not None:
            raise error
        if ev is None:
            raise _ended()
        return index, ev

    async def aclose(self) -> None:
        """Stop every choice (each generator closed, even when closing another one raised)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        errors = []
        for events in self._generators:
            try:
                await events.aclose()   # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - raised below, once all are closed
                errors.append(e)
        if errors:
            raise errors[0]


def _ended() -> BackendError:
    return BackendError("the backend ended the request without a final token", 500)
