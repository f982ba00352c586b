"""Encoder node: images in, vision embeddings out to the prefill node over UCX.

Queues: pending (EncodeRequests received) -> one batched vision forward per tick over every
pending image not in the embedding cache -> sent (one UCX message per request, key
`{rid}:emb`, one tensor per image, their layouts in the metadata), or, when the prefill node offered
an `EmbeddingSlot` in time (CUDA IPC, `epd.node.embedding_arena`), written into its rows and
announced by a message without tensors. The cache is keyed by image content hash and layout, so a
repeated image skips the vision tower. An Abort drops a pending request.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import torch
from PIL import Image

from epd import protocol
from epd.config import ModelConfig
from epd.media.encoded import EncodedImage, decode_each
from epd.models.family import ImageLayout
from epd.node.embedding_arena import ArenaWriter
from epd.node.throughput import Throughput
from kv_transfer.registry import NodeRegistry

log = logging.getLogger(__name__)
# How long a finished image waits for the prefill node's arena slot (sent as the router's request
# reaches that node) before its embeddings go over the wire instead: the wire costs tens of ms an
# image where the CUDA IPC write costs a few (BENCHMARKS.md); a tiny vision tower finishes first.
SLOT_WAIT_S = 0.01


class EmbeddingCache:
    """LRU of (content hash, layout) -> (embeddings, image layout)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[torch.Tensor, ImageLayout]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: str, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class EncoderService:
    def __init__(self, config: ModelConfig, device: str, dtype: torch.dtype, max_batch_images: int = 32,
                 cache_entries: int = 256, max_batch_image_tokens: int = 16384) -> None:
        self.config = config
        self.family = config.family
        self.vision = config.family.build_vision(device, dtype)
        self.processor = config.family.image_processor(on_device=self.vision.device.type == "cuda")
        self.cache = EmbeddingCache(cache_entries)
        self.max_batch_images = max_batch_images
        self.max_batch_image_tokens = max_batch_image_tokens   # a vision forward's size, in image tokens
        self.pending: OrderedDict[str, tuple[bytes, protocol.EncodeRequest, float]] = OrderedDict()
        self.images_encoded = 0   # the periodic stats line
        self.throughput = Throughput()   # image tokens per busy second (NodeStatus.rates)
        self.runtime: Any = None   # set by main: NodeRuntime (send, transport, node_id)
        self.arenas = ArenaWriter(self.vision.device) if self.vision.device.type == "cuda" else None
        self.arena_writes = 0     # requests whose embeddings went into a prefill node's arena
        self._last_arena_sweep = 0.0
        self._warm_up()

    def _warm_up(self) -> None:
        """Run one small image so the first request does not pay lazy initialisation."""
        self.vision.encode(self.processor.preprocess_many([Image.new("RGB", (56, 56))]))

    def handle(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, protocol.EncodeRequest):
            if msg.rid in self.pending:   # the request that has this id goes on untouched
                log.warning("refused a second request with id %r", msg.rid)
                return
            self.pending[msg.rid] = (identity, msg, time.monotonic())
            self.runtime.transport.connect(msg.prefill_ucx)  # overlap connection setup with encoding
            if msg.emb_ipc and self.arenas is not None:   # the prefill node's slot may come
                self.runtime.transport.expect(f"{msg.rid}:embslot", peer=msg.prefill_ucx, max_bytes=0)
        elif isinstance(msg, protocol.Abort):
            if self.pending.pop(msg.rid, None) is not None:
                self.runtime.transport.ignore(f"{msg.rid}:embslot")

    def load(self) -> float:
        return float(len(self.pending))

    def held(self) -> int:
        """Requests the node still owes an answer (a draining node exits at 0)."""
        return len(self.pending) + self.runtime.transport.sends_in_flight

    def tick(self) -> bool:
        self._unmap_gone_arenas()
        if not self.pending:
            return False
        batch, count, tokens = [], 0, 0
        for rid, item in list(self.pending.items()):   # arrival order, by image tokens (and images)
            needs = self._image_tokens(item[1])
            if batch and (count + len(item[1].images) > self.max_batch_images
                          or tokens + needs > self.max_batch_image_tokens):
                break
            batch.append(item)
            count, tokens = count + len(item[1].images), tokens + needs
            del self.pending[rid]
        t0 = time.monotonic()
        try:
            results, preprocess_ms = self._encode(batch)
        except Exception as e:  # noqa: BLE001 - a bad batch fails its requests, not the node
            log.exception("encoding failed")
            for identity, req, _ in batch:
                self._report(identity, req, ok=False, error=f"encoder failed: {e}")
            return True
        encode_ms = (time.monotonic() - t0) * 1e3
        self.images_encoded += sum(len(req.images) for _, req, _ in batch)   # those with a bad image were dropped
        self.throughput.add(sum(self._image_tokens(req) for _, req, _ in batch), encode_ms / 1e3)
        for (identity, req, arrived), (embeds, layouts) in zip(batch, results, strict=True):
            self._send(req, embeds, layouts)
            self._report(identity, req, ok=True, timings={
                "encoder_queue_ms": (t0 - arrived) * 1e3, "encode_ms": encode_ms,
                "preprocess_ms": preprocess_ms, "vision_ms": encode_ms - preprocess_ms,
                "encoder_received_at": protocol.wall_time(arrived),
                "encoded_at": protocol.wall_time(t0) + encode_ms / 1e3})
        return True

    def _encode(self, batch) -> tuple[list[tuple[list[torch.Tensor], list[ImageLayout]]], float]:
        """One vision forward for every image of the batch that is not cached; also returns the ms
        spent preprocessing."""
        per_request, uncached = [], {}
        t0 = time.monotonic()
        for _, req, _ in batch:
            keys = [f"{p.content_hash}:{p.layout}" for p in req.images]   # an image, laid out so
            for key, payload in zip(keys, req.images, strict=True):
                if key not in uncached and self.cache.get(key) is None:
                    uncached[key] = payload
            per_request.append(keys)
        images = self._pixels(batch, per_request, uncached)
        layouts = [ImageLayout.from_wire(p.layout) for p in uncached.values()]
        todo = list(zip(uncached, self.processor.preprocess_many(images, layouts), strict=True))
        preprocess_ms = (time.monotonic() - t0) * 1e3
        if todo:
            for (key, pre), emb in zip(todo, self.vision.encode([pre for _, pre in todo]), strict=True):
                self.cache.put(key, (emb, pre.layout))
            if self.vision.device.type == "cuda":   # vision_ms is the GPU's time, not the launches'
                torch.cuda.synchronize(self.vision.device)
        out = []
        for slots in per_request:
            items = [self.cache._items[k] for k in slots]
            out.append(([e.contiguous() for e, _ in items], [g for _, g in items]))
        return out, preprocess_ms

    def _pixels(self, batch: list, per_request: list[list[str]], uncached: dict[str, Any]) -> list[Image.Image]:
        """The uncached images' RGB pixels, in order: encoded bytes decoded on a few threads, each held
        to its declared size (epd.media.encoded); RGB as it came. A request with an image that cannot
        be decoded is failed and dropped from `batch` and `per_request`; the others go on."""
        first_place: dict[str, int] = {}   # where a key first appears in its request: "image N" in errors
        for slots in per_request:
            for i, key in enumerate(slots):
                first_place.setdefault(key, i)
        encoded = [key for key, p in uncached.items() if p.data]
        decoded = dict(zip(encoded, decode_each([EncodedImage.declared(uncached[k].data, uncached[k].width,
                                                                       uncached[k].height) for k in encoded],
                                                [first_place[k] for k in encoded]), strict=True))
        bad = {key: str(result) for key, result in decoded.items() if isinstance(result, Exception)}
        if bad:
            kept = []
            for item, slots in zip(batch, per_request, strict=True):
                problem = next((bad[k] for k in slots if k in bad), None)
                if problem is None:
                    kept.append((item, slots))
                else:
                    self._report(item[0], item[1], ok=False, error=f"bad image: {problem}", bad_input=True)
            batch[:], per_request[:] = [item for item, _ in kept], [slots for _, slots in kept]
            for key in bad:
                del uncached[key]
        return [decoded[k] if k in decoded else Image.frombytes("RGB", (p.width, p.height), p.rgb)
                for k, p in uncached.items()]

    def _send(self, req: protocol.EncodeRequest, embeds: list[torch.Tensor], layouts: list[ImageLayout]) -> None:
        """Into the prefill node's arena when its slot is in and the write works, else over the wire."""
        wires = [layout.to_wire() for layout in layouts]
        transport = self.runtime.transport
        slot = None
        if req.emb_ipc and self.arenas is not None:
            try:
                try:
                    msg = transport.wait(f"{req.rid}:embslot", SLOT_WAIT_S)
                except TimeoutError:
                    msg = None
                if msg is None:   # not in yet: the wire it is, and a late slot is dropped as it lands
                    transport.ignore(f"{req.rid}:embslot")
                else:
                    slot = protocol.read_data_meta(msg.meta, protocol.EmbeddingSlot, req.rid)
                    self.arenas.write(slot.arena, slot.first_row, embeds)
            except Exception as e:  # noqa: BLE001 - the embeddings go over the wire instead
                if slot is None or self.arenas.first_failure(slot.arena):
                    log.warning("embeddings of %s to prefill node %s go over UCX: %s", req.rid, req.prefill_node,
                                f"the CUDA IPC write failed ({e})" if slot else f"bad slot ({e})")
                slot = None
        if slot is not None:
            self.arena_writes += 1
            transport.send(req.prefill_ucx, f"{req.rid}:emb", [],
                           meta=protocol.data_meta(protocol.Embeddings(req.rid, wires, in_arena=True)))
        else:
            transport.send(req.prefill_ucx, f"{req.rid}:emb", embeds,
                           meta=protocol.data_meta(protocol.Embeddings(req.rid, wires)))

    def _unmap_gone_arenas(self, every_s: float = 5.0) -> None:
        """Every few seconds while arenas are mapped: unmap those of prefill nodes that left the registry."""
        now = time.monotonic()
        if self.arenas is None or not len(self.arenas.imports) or now - self._last_arena_sweep < every_s:
            return
        self._last_arena_sweep = now
        try:
            live = {n.node_id for n in NodeRegistry(self.runtime.redis, self.runtime.secret).list_nodes("prefill")}
        except Exception:  # noqa: BLE001 - Redis down: nobody is known to be gone
            return
        for arena_id in self.arenas.drop_orphans(live):
            log.info("unmapped the embedding arena %s of a prefill node that is gone", arena_id)

    def _report(self, identity: bytes, req: protocol.EncodeRequest, ok: bool, error: str = "",
                timings: dict | None = None, bad_input: bool = False) -> None:
        """bad_input: the request's own data is at fault (an image that does not decode), not this node."""
        info = {"cache_hits": self.cache.hits, **({"bad_input": True} if bad_input else {})}
        self.runtime.send(identity, protocol.StageReport(req.rid, "encode", self.runtime.node_id, ok, error,
                                                         timings or {}, info))

    def counters(self) -> dict[str, float]:
        return {"images": self.images_encoded}

    def status(self) -> dict[str, Any]:
        queued = sum(self._image_tokens(req) for _, req, _ in self.pending.values())
        return {"queues": {"pending": len(self.pending), "cache_entries": len(self.cache._items),
                           "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                           "queued_image_tokens": queued},
                "rates": {"image_tokens": self.throughput.rate}}

    def shutdown(self) -> None:
        self.pending.clear()

    def _image_tokens(self, req: protocol.EncodeRequest) -> int:
        """The rows a request asks the vision tower for (cached ones included; a layout that is
        not the family's counts none: the request fails when it is preprocessed)."""
        return sum(self.family.wire_embedding_rows(p.layout) for p in req.images)
