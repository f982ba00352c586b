"""Continuous batching with chunked prefill and a token budget per step.

Queues, in order: waiting (FIFO, nothing allocated) -> running -> finished.
Each step `schedule()` builds a flat batch under `max_step_tokens`:
  1. every running request with one pending token (decode) gets it;
  2. running requests still prefilling get the next chunk of their prompt;
  3. waiting requests are admitted while the budget, `max_running` and free pages allow
     (a request is admitted only if its whole pending context fits in the free pages).
Pages are allocated as tokens are scheduled. When a decode needs a page and none is free, the
most recently admitted other request is preempted: its pages are freed and it returns to the
front of the waiting queue, to be recomputed later (prompt + output so far), so nothing is lost.
Every request's pages are freed exactly once, when it finishes, aborts or is preempted.
With `prefix_caching`, an admitted request first takes the pages that already hold its longest
cached prefix (full pages, at least its last token left to compute: `cached_tokens`), and each
page a step fills is registered under its prefix hash (`epd.engine.prefix_cache`) as soon as the step
is launched (later steps run after it on the same stream), so requests running at the same time
share a prompt's prefix too; pages holding output tokens still on the device are registered
when the request lets them go.
While the engine has a step in flight (overlap schedule) it sets `fence` to a list: pages of
requests that finish or abort go there instead of back to the pool, and the engine frees them
once that step has run, so no step still running writes into pages another owner now holds
(a decode node hands free pages to a prefill node's CUDA IPC writes). Preempted pages go back
at once: only later steps on the same stream can use them.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from epd.engine.kv_pool import KVCache
from epd.engine.prefix_cache import cross_page_hashes, page_hashes
from epd.engine.request import Request, Status


@dataclass
class Chunk:
    req: Request
    start: int      # first token index computed in this step
    length: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so the step yields a new token."""
        return self.start + self.length == self.req.total_len


class Scheduler:
    def __init__(self, kv: KVCache, max_running: int, max_step_tokens: int, prefix_caching: bool = False) -> None:
        self.kv = kv
        self.pool = kv.pool
        self.prefix_caching = prefix_caching
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.fence: list[int] | None = None   # set by the engine while a step is in flight

    def add(self, req: Request) -> None:
        need = self.pool.pages_for(req.max_total_tokens) + self._cross_need(req)
        if need > self.pool.capacity:
            raise ValueError(f"request needs up to {req.max_total_tokens} tokens of KV cache; the pool holds "
                             f"{self.pool.capacity * self.pool.page_size}")
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        budget = self.max_step_tokens
        scheduled: set[str] = set()   # decodes already in this step: never preempted for another
        for req in [r for r in self.running if r.pending_tokens == 1 and not r.capped]:
            if req.status is not Status.RUNNING or budget == 0:
                continue
            if self._grow(req, req.total_len, protected=scheduled):
                chunks.append(Chunk(req, req.num_computed, 1))
                scheduled.add(req.rid)
                budget -= 1
        for req in [r for r in self.running if r.pending_tokens > 1]:
            if budget == 0:
                break
            n = min(req.pending_tokens, budget)
            if self._grow(req, req.num_computed + n):
                chunks.append(Chunk(req, req.num_computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            hits = self._prefix_hits(req)
            cross_hits = self._cross_hits(req)
            cross = 0 if cross_hits else self._cross_need(req)
            need = self.pool.pages_for(req.total_len) - len(hits) + self.pool.cost(hits + cross_hits) + cross
            if need > self.pool.num_free - self._owed_to_prefills():
                break
            self.waiting.popleft()
            if hits:
                self.pool.acquire(hits)
                req.pages, req.pages_registered = list(hits), len(hits)
                req.num_computed = len(hits) * self.pool.page_size
                if not req.output_ids:   # the first admission (not a preempted request's return)
                    req.cached_tokens = req.num_computed
            if cross_hits:   # another request's image rows, the same images'
                self.pool.acquire(cross_hits)
                req.cross_pages, req.cross_ready = list(cross_hits), True
            elif cross:   # the image rows' pages (after the hits are held: allocating may evict)
                req.cross_pages, req.cross_ready = self.pool.allocate(cross), False
            req.status = Status.RUNNING
            self.running.append(req)
            n = min(req.pending_tokens, budget)
            self._grow(req, req.num_computed + n)
            chunks.append(Chunk(req, req.num_computed, n))
            budget -= n
        if not chunks and len(self.running) > 1 and not any(r.awaiting_token for r in self.running):
            self._preempt(self.running[-1])  # prefills starved of pages: give the oldest room
            return self.schedule()
        return chunks

    def _cross_need(self, req: Request) -> int:
        """Pages the request's image rows take (cross-attention families; 0 once it holds them)."""
        rows = req.inp.num_cross_rows if req.inp is not None else 0
        return self.pool.pages_for_rows(rows) if rows and not req.cross_pages else 0

    def _cross_hits(self, req: Request) -> list[int]:
        """Pages holding all of req's image rows already (cached by a request with its images), or []."""
        if not self.prefix_caching or not req.inp.cross_rows or req.cross_pages:
            return []
        hashes = cross_page_hashes(req, self.pool.cross_page_rows)
        pages = self.pool.match(hashes) if hashes else []
        return pages if len(pages) == len(hashes) else []

    def register_cross(self, req: Request) -> None:
        """req's image rows are written (by a launched step): offer their pages to requests with its images."""
        if self.prefix_caching and req.cross_pages:
            self.pool.register(req.cross_pages, cross_page_hashes(req, self.pool.cross_page_rows))

    def _prefix_hits(self, req: Request) -> list[int]:
        """Pages already holding the longest cached prefix of req's tokens, leaving at least its
        last token to compute (its logits give the next token)."""
        if not self.prefix_caching or req.num_computed:
            return []
        return self.pool.match(page_hashes(req, req.total_len - 1, self.pool.page_size))

    def _register(self, req: Request) -> None:
        """Offer req's full pages whose KV is computed (or being computed by a launched step) to
        other requests with the same prefix."""
        done = req.pages_registered
        if not self.prefix_caching or req.num_computed // self.pool.page_size <= done:
            return
        hashes = page_hashes(req, req.num_computed, self.pool.page_size)
        self.pool.register(req.pages[done:len(hashes)], hashes[done:])
        req.pages_registered = max(done, len(hashes))

    def _owed_to_prefills(self) -> int:
        """Pages running prefills still need to finish their prompt (kept back from admission)."""
        return sum(max(0, self.pool.pages_for(r.total_len) - len(r.pages))
                   for r in self.running if r.pending_tokens > 1)

    def _grow(self, req: Request, num_tokens: int, protected: set[str] | None = None) -> bool:
        """Make req's pages cover num_tokens; with `protected` given (decodes), preempt the newest
        running request that is neither req nor already scheduled this step."""
        need = self.pool.pages_for(num_tokens) - len(req.pages)
        while need > self.pool.num_free:
            victim = None if protected is None else next(
                (r for r in reversed(self.running) if r is not req and r.rid not in protected), None)
            if victim is None:
                return False
            self._preempt(victim)
        if need > 0:
            req.pages.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        self._release(req, fenced=False)
        req.num_computed = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _release(self, req: Request, fenced: bool = True) -> None:
        if req in self.running:
            self.running.remove(req)
        self._register(req)
        held = req.pages + req.cross_pages
        if held:
            if fenced and self.fence is not None:
                self.fence.extend(held)
            else:
                self.pool.free(held)
            req.pages, req.cross_pages, req.cross_ready = [], [], False
        req.pages_registered = 0

    def advance(self, chunks: list[Chunk]) -> None:
        """Record that the scheduled tokens' KV is now in the cache."""
        for c in chunks:
            c.req.num_computed = c.start + c.length
            self._register(c.req)

    def detach(self, req: Request) -> tuple[list[int], list[int]]:
        """Take a running request out of the batch; its pages (token pages, image-row pages) now
        belong to the caller (a prefill node keeps them until the KV transfer is acknowledged,
        then frees them)."""
        self.running.remove(req)
        self._register(req)
        pages, cross, req.pages, req.cross_pages, req.cross_ready = req.pages, req.cross_pages, [], [], False
        req.status = Status.FINISHED
        return pages, cross

    def admit_prefilled(self, req: Request) -> None:
        """Put a request whose prompt KV is already in its pages straight into the batch."""
        assert req.pages and req.num_computed == req.prompt_len, "KV must be in place"
        assert req.cross_ready or not req.inp.cross_rows, "image rows must be in place"
        req.status = Status.RUNNING
        self.running.append(req)

    def finish(self, req: Request, reason: dict) -> None:
        if req.status is Status.WAITING and req in self.waiting:   # preempted while its token was in flight
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        self._release(req)

    def abort(self, rid: str) -> Request | None:
        for queue in (self.running, list(self.waiting)):
            for req in queue:
                if req.rid == rid:
                    if req in self.waiting:
                        self.waiting.remove(req)
                    self.finish(req, {"type": "abort", "message": "aborted"})
                    return req
        return None

    def check_integrity(self, held_elsewhere: list[int] = ()) -> None:
        """free + cached + in use == total, and every in-use page has exactly as many owners as live
        requests hold it (plus `held_elsewhere`: pages a node holds outside the batch, e.g. in
        transfer; and the fence). Without prefix caching each page has one owner."""
        self.pool.check_integrity()
        owned = Counter(p for r in self.running for p in r.pages + r.cross_pages)
        owned += Counter(held_elsewhere) + Counter(self.fence or [])
        if not self.prefix_caching and any(n > 1 for n in owned.values()):
            raise AssertionError("a KV page is owned by two requests")
        if owned != Counter(self.pool.owner_counts()):
            raise AssertionError(f"{self.pool.num_in_use} pages in use but running requests own {len(owned)}")
        if any(r.pages or r.cross_pages for r in self.waiting):
            raise AssertionError("a waiting request holds pages")
