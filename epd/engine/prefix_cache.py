"""Automatic prefix caching: the hash that names each full KV page of a request.

Page i of a request holds tokens [i * page_size, (i + 1) * page_size). Its hash covers everything
up to its end: h_i = blake2b(h_(i-1), the page's token ids, the identity of every image with a
token in the page). Equal hashes mean equal tokens and images up to there, hence equal
positions and equal KV, so a request can take another's pages for its prefix instead of
computing them (`PagePool.match` / `acquire`); its own full pages are registered for other
requests as steps fill them and when it lets them go (`Scheduler`).

For a model whose images enter through cross-attention, the KV of every token, even before the
first image, depends on all the request's images: their identities start the chain instead.
A request's `cache_salt` (vLLM's name; a tenant's, say) starts the chain, so requests under
different salts never share a page: one cannot learn from `cached_tokens` what another's prompts
began with. An image's identity is its `content_hash` (a digest of its pixels, or the router's key for the
encoder's cache). An image without one (embeddings handed in directly) ends the chain at the
first page it touches, as do output tokens still on the device (overlap schedule placeholders).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from epd.engine.request import Request


def page_hashes(req: Request, num_tokens: int, page_size: int) -> list[bytes]:
    """Hashes of the request's full pages within its first `num_tokens` tokens (fewer where the
    chain ends early). Extends `req.page_hashes` (prompt and known outputs never change)."""
    hashes = req.page_hashes
    pages = min(num_tokens, req.total_len) // page_size
    if len(hashes) >= pages:
        return hashes[:pages]
    first = len(hashes)
    spans = [(start, im.num_tokens, im.content_hash)
             for start, im in zip(req.inp.image_offsets, req.inp.images, strict=False)]
    previous = hashes[-1] if hashes else req.params.cache_salt.encode()   # a salt is its own namespace
    if req.inp.cross_rows:   # cross-attention: every token's KV depends on every image of the request
        keys = [im.content_hash for im in req.inp.images]
        if not hashes and any(key is None for key in keys):
            return []
        spans = []
        if not hashes:
            previous = hashlib.blake2b(previous + "".join(keys).encode(), digest_size=16).digest()
    hashes.extend(chained_page_hashes(previous, req.token_at(first * page_size, pages * page_size), first,
                                      page_size, spans))
    return list(hashes)


def chained_page_hashes(previous: bytes, ids: Sequence[int], first_page: int, page_size: int,
                        image_spans: Sequence[tuple[int, int, str | None]]) -> list[bytes]:
    """The chain of hashes of the full pages that `ids` holds, page `first_page` on (`ids` starts
    at its first token), after `previous`: each covers its token ids and the identity of every
    image (start, tokens, content hash) with a token in it. The chain ends at a page holding a
    negative id or an image without a content hash."""
    out = []
    for i in range(first_page, first_page + len(ids) // page_size):
        lo, hi = i * page_size, (i + 1) * page_size
        page_ids = ids[lo - first_page * page_size:hi - first_page * page_size]
        if min(page_ids) < 0:
            break
        keys = [key for start, count, key in image_spans if start < hi and start + count > lo]
        if any(key is None for key in keys):
            break
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(array("q", page_ids).tobytes())
        for key in keys:
            digest.update(key.encode())
        previous = digest.digest()
        out.append(previous)
    return out


def cross_page_hashes(req: Request, rows_per_page: int) -> list[bytes]:
    """Names of the pages holding a cross-attention request's image rows: its images in order (their
    identities and layouts, under its cache salt) and the page's index; [] when an image has no
    identity. Requests with the same images share those pages (no vision forward, no K/V again)."""
    keys = [im.content_hash for im in req.inp.images]
    if not req.inp.cross_rows or any(key is None for key in keys):
        return []
    base = hashlib.blake2b(b"image-rows", digest_size=16)
    base.update(req.params.cache_salt.encode())
    for key, im in zip(keys, req.inp.images, strict=True):
        base.update(key.encode() + array("q", im.layout.to_wire()).tobytes())
    pages = -(-req.inp.num_cross_rows // rows_per_page)
    return [hashlib.blake2b(base.digest() + i.to_bytes(4, "little"), digest_size=16).digest() for i in range(pages)]
