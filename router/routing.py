"""Routing policies: which node of a pool gets a request, from what the nodes report and hold.

Policies (`--routing-policy`, or per pool `--encoder-policy` / `--prefill-policy` / ...):
- `round_robin`: cycles through the pool's live nodes.
- `least_load`: the node with the least queued work, from its own last report (`NodeStatus`:
  image tokens queued at an encoder, prompt tokens queued at a prefill or colocated node, KV
  pages in use at a decode node) plus what this router sent it since that report; requests in
  flight break ties (and stand in for a node that has not reported yet).
- `cache_aware`: where a pool keeps a cache, go where the request's inputs already are, unless
  that node is much busier than the least loaded one (then `least_load`):
    encoder: image affinity, each image's content hash placed on a node by rendezvous hashing
      (stable while nodes come and go), so a repeated image hits that encoder's embedding cache;
    prefill, colocated: prefix affinity, the node that was last sent the longest run of this
      prompt's leading blocks (token blocks chained with the images' hashes, as the nodes' prefix
      caches key them), when that run is at least `MIN_MATCH` of the prompt;
    decode: `least_load` (decode keeps no cache).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from epd.engine.prefix_cache import chained_page_hashes

POLICIES = ("cache_aware", "least_load", "round_robin")
BLOCK_TOKENS = 16          # prefix blocks the router tracks (finer than any node's page)
MAX_BLOCKS = 1 << 18       # block hashes remembered per pool (LRU)
MIN_MATCH = 0.5            # of a prompt's blocks, for prefix affinity to decide
IMBALANCE = 2.0            # an affine node busier than this x the least loaded (with the request) loses it
LOAD_QUEUE = {"encoder": "queued_image_tokens", "prefill": "queued_prompt_tokens",
              "colocated": "queued_prompt_tokens"}


@dataclass
class Work:
    """What one request asks of each pool, in the unit that pool's load is measured in."""
    image_tokens: int
    prompt_tokens: int
    image_hashes: Sequence[str]
    block_hashes: list[bytes]

    def amount(self, role: str) -> float:
        return float(self.image_tokens if role == "encoder" else self.prompt_tokens)


def block_hashes(input_ids: Sequence[int], image_spans: Sequence[tuple[int, int, str | None]]) -> list[bytes]:
    """The chained hashes of a prompt's full `BLOCK_TOKENS` blocks, as the nodes' prefix caches
    chain their pages (`chained_page_hashes`: token ids, and the content hash of each image with
    a token in the block; the chain ends at an image without one)."""
    return chained_page_hashes(b"", input_ids, 0, BLOCK_TOKENS, image_spans)


class PrefixIndex:
    """Which node each prompt block was last sent to (per pool, bounded LRU)."""

    def __init__(self, capacity: int = MAX_BLOCKS) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def longest(self, blocks: list[bytes], candidates: set[str]) -> tuple[str | None, int]:
        """The candidate holding the longest run of leading blocks, and that run's length."""
        best, run = None, 0
        for i, block in enumerate(blocks):
            owner = self._owner.get(block)
            if owner is None or owner not in candidates or (best is not None and owner != best):
                break
            best, run = owner, i + 1
        return best, run

    def record(self, blocks: list[bytes], node_id: str) -> None:
        for block in blocks:
            self._owner[block] = node_id
            self._owner.move_to_end(block)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, live: set[str]) -> None:
        for block in [b for b, owner in self._owner.items() if owner not in live]:
            del self._owner[block]


def rendezvous(key: str, node_ids: Sequence[str]) -> str:
    """Highest-random-weight hashing: `key`'s node, stable when other nodes come or go."""
    return max(node_ids, key=lambda n: hashlib.blake2b(f"{key}|{n}".encode(), digest_size=8).digest())


def affine_node(role: str, work: Work, candidates: Sequence[str], index: PrefixIndex | None,
                hash_unseen: bool = False) -> str | None:
    """The node `cache_aware` prefers for this request in pool `role` (None: no preference).
    `hash_unseen`: a prompt whose first block this router never sent goes where rendezvous hashing
    of that block says, so that several router processes (each with its own index) send a shared
    prefix to the same node without telling each other."""
    if role == "encoder" and work.image_hashes:
        return rendezvous(work.image_hashes[0], candidates)
    if role in ("prefill", "colocated") and index is not None and work.block_hashes:
        node, run = index.longest(work.block_hashes, set(candidates))
        if node is not None and run >= MIN_MATCH * len(work.block_hashes):
            return node
        if node is None and hash_unseen:
            return rendezvous(work.block_hashes[0].hex(), candidates)
    return None


def balanced(preferred: float, least: float, request: float) -> bool:
    """Whether a node with load `preferred` may still take a request of size `request` over the
    least loaded node's `least`: its queue is at most IMBALANCE x what the least loaded node's
    would be with the request."""
    return preferred <= IMBALANCE * (least + request)
