"""Same-host GPU KV hand-over through CUDA IPC: the prefill node writes a request's KV straight
into the pages the decode node reserved for it, one read and one write per byte, in one kernel.

The UCX path moves a request's KV three times (gather into a wire tensor, UCX copy, scatter into
pages) and pays ~1 ms of fixed latency per message (BENCHMARKS.md section 4). When both nodes
share a host and a page size, this path replaces it (decode pre-allocates, prefill writes, as
in SGLang's and Mooncake's disaggregation):

1. `host_key()` names the machine (its boot id); two processes can map each other's CUDA memory
   only when it matches. Nodes publish it with their page size in their registry record.
2. Decode: `export_pool(layers)` once -> a msgpack-able descriptor (CUDA IPC handles of every
   layer tensor, plus dtype and shape). When it reserves a request's pages it sends the
   descriptor and the page ids to the prefill node, long before prefill finishes.
3. Prefill: `PoolImports.writer(desc, layers)` maps the peer's pool once and caches a
   `PageWriter` (the layer-offset table is built once per pool pair); `PageWriter.copy` queues
   the copy of the request's pages into decode's right behind the last layer on the GPU
   (`write` also waits for it), then prefill frees its own pages and tells decode the KV is in
   place.

Handles are plain bytes/ints/strings in msgpack; nothing is pickled.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only hosts
    triton = None
    tl = None

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64}


def host_key() -> str:
    """This machine's boot id (falls back to the host name) and this process's IPC namespace: two
    containers (pods) on one machine share the boot id but not the namespace, and do not pair."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            machine = f.read().strip()
    except OSError:
        machine = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/ipc")
    except OSError:
        namespace = ""
    return f"{machine}:{namespace}" if namespace else machine


def ipc_capability(device: torch.device | str, page_size: int) -> str:
    """What a node advertises: "" when it cannot take part (not CUDA), else host key + page size."""
    return f"{host_key()}/{page_size}" if torch.device(device).type == "cuda" else ""


def export_pool(layers: list[torch.Tensor], owner: str = "") -> dict[str, Any]:
    """IPC descriptor of a pool's layer tensors (each must start its storage and be contiguous).

    owner: the exporting node's id, so importers can unmap the pool once that node is gone."""
    first = layers[0]
    handles = []
    for layer in layers:
        if layer.storage_offset() != 0 or not layer.is_contiguous():
            raise ValueError("pool layers must be whole, contiguous tensors")
        fields = layer.untyped_storage()._share_cuda_()
        handles.append([_plain(x) for x in fields])
    return {"id": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", "owner": owner, "host": host_key(),
            "dtype": str(first.dtype).removeprefix("torch."), "shape": list(first.shape), "handles": handles}


def _plain(x: Any) -> Any:
    if isinstance(x, bool | int | bytes | str) or x is None:
        return x
    if isinstance(x, torch.device):
        return x.index
    raise TypeError(f"unexpected IPC field {type(x).__name__}")


class PoolImports:
    """Peer pools mapped into this process, by descriptor id (mapped once, kept until `drop`)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._pools: dict[str, list[torch.Tensor]] = {}
        self._owners: dict[str, str] = {}
        self._writers: dict[str, PageWriter] = {}

    def layers(self, desc: dict[str, Any]) -> list[torch.Tensor]:
        pool = self._pools.get(desc["id"])
        if pool is None:
            if desc["host"] != host_key():
                raise ValueError(f"pool {desc['id']} is on another host")
            dtype, shape = _DTYPES[desc["dtype"]], tuple(desc["shape"])
            with torch.cuda.device(self.device):
                pool = [_map(fields, dtype, shape, self.device) for fields in desc["handles"]]
            self._pools[desc["id"]] = pool
            self._owners[desc["id"]] = desc.get("owner", "")
        return pool

    def writer(self, desc: dict[str, Any], local_layers: list[torch.Tensor]) -> PageWriter:
        """A writer from our `local_layers` into the peer pool `desc` (mapped on first use)."""
        writer = self._writers.get(desc["id"])
        if writer is None:
            writer = self._writers[desc["id"]] = PageWriter(local_layers, self.layers(desc))
        return writer

    def drop(self, pool_id: str) -> None:
        self._writers.pop(pool_id, None)
        self._pools.pop(pool_id, None)
        self._owners.pop(pool_id, None)

    def drop_orphans(self, live_owners: set[str]) -> list[str]:
        """Unmap the pools of nodes that are gone (their GPU memory stays allocated while mapped)."""
        gone = [pid for pid, owner in self._owners.items() if owner not in live_owners]
        for pid in gone:
            self.drop(pid)
        return gone

    def __len__(self) -> int:
        return len(self._pools)


def _map(fields: list[Any], dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared_cuda(*fields)
    out = torch.empty(0, dtype=dtype, device=device)
    out.set_(storage, 0, shape)
    return out


class PageWriter:
    """Copies pages of one pool into another: dst_layers[l][dst_pages[i]] = src_layers[l][src_pages[i]].

    Built once per pool pair (checks, the device table of layer offsets, a pinned staging
    buffer for page ids); each `copy` then costs one small asynchronous host-to-device copy of the
    page ids and one Triton kernel over (chunk, page, layer) on CUDA, or a per-layer index copy
    elsewhere.
    """

    def __init__(self, src_layers: list[torch.Tensor], dst_layers: list[torch.Tensor]) -> None:
        if len(src_layers) != len(dst_layers) or src_layers[0].shape[1:] != dst_layers[0].shape[1:] \
                or src_layers[0].dtype != dst_layers[0].dtype:
            raise ValueError("source and destination pools differ in layers, page shape or dtype")
        self.src, self.dst = src_layers, dst_layers
        self.device = dst_layers[0].device
        page_bytes = src_layers[0][0].numel() * src_layers[0].element_size()
        aligned = all(t.data_ptr() % 16 == 0 for t in (*src_layers, *dst_layers))
        self.fast = triton is not None and self.device.type == "cuda" and page_bytes % 16 == 0 and aligned
        self.words = page_bytes // 4
        if self.fast:
            # Layers as word offsets from layer 0 (16-byte multiples), so the kernel takes plain
            # tensors and its loads vectorise.
            src0, dst0 = src_layers[0].data_ptr(), dst_layers[0].data_ptr()
            offsets = [(t.data_ptr() - src0) // 4 for t in src_layers]
            offsets += [(t.data_ptr() - dst0) // 4 for t in dst_layers]
            self.layer_offsets = torch.tensor(offsets, dtype=torch.int64, device=self.device)
            self.src_words = src_layers[0].view(-1).view(torch.int32)
            self.dst_words = dst_layers[0].view(-1).view(torch.int32)
            pages = 2 * max(src_layers[0].shape[0], dst_layers[0].shape[0])   # src ids, then dst ids
            self._staging = torch.empty(pages, dtype=torch.int64).pin_memory()
            self._pages = torch.empty(pages, dtype=torch.int64, device=self.device)
            self._staged = torch.cuda.Event()   # the staging buffer may be refilled once this passed

    @torch.inference_mode()   # its buffers may have been made inside a forward (inference tensors)
    def copy(self, src_pages: list[int], dst_pages: list[int]) -> None:
        """Queue the copy on the current stream (call `torch.cuda.synchronize` or `write` to wait)."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
        if not src_pages:
            return
        n, layers = len(src_pages), len(self.src)
        if not self.fast:
            src_idx = torch.tensor(src_pages, dtype=torch.int64, device=self.src[0].device)
            dst_idx = torch.tensor(dst_pages, dtype=torch.int64, device=self.device)
            for src, dst in zip(self.src, self.dst, strict=True):
                dst.index_copy_(0, dst_idx, src.index_select(0, src_idx).to(self.device))
            return
        self._staged.synchronize()
        staging = self._staging.numpy()
        staging[:n], staging[n:2 * n] = src_pages, dst_pages
        pages = self._pages[:2 * n]
        pages.copy_(self._staging[:2 * n], non_blocking=True)
        self._staged.record()
        block = min(4096, triton.next_power_of_2(self.words))
        grid = (triton.cdiv(self.words, block), n, layers)
        _copy_pages_kernel[grid](self.src_words, self.dst_words, self.layer_offsets[:layers],
                                 self.layer_offsets[layers:], pages[:n], pages[n:],
                                 PAGE_WORDS=self.words, BLOCK=block, num_warps=4)

    def write(self, src_pages: list[int], dst_pages: list[int]) -> None:
        """Copy and wait until the pages are in place (the peer may read them once this returns)."""
        self.copy(src_pages, dst_pages)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def copy_pages(src_layers: list[torch.Tensor], dst_layers: list[torch.Tensor], src_pages: list[int],
               dst_pages: list[int]) -> None:
    """dst_layers[l][dst_pages[i]] = src_layers[l][src_pages[i]] for every layer l, page i (queued)."""
    PageWriter(src_layers, dst_layers).copy(src_pages, dst_pages)


if triton is not None:
    @triton.jit
    def _copy_pages_kernel(src0, dst0, src_layer_offs, dst_layer_offs, src_pages, dst_pages,
                           PAGE_WORDS: tl.constexpr, BLOCK: tl.constexpr):
        chunk = tl.program_id(0)
        i = tl.program_id(1)
        layer = tl.program_id(2)
        # layer offsets are multiples of 4 words (16 bytes, checked by the caller)
        src_off = tl.multiple_of(tl.load(src_layer_offs + layer), 4) + tl.load(src_pages + i) * PAGE_WORDS
        dst_off = tl.multiple_of(tl.load(dst_layer_offs + layer), 4) + tl.load(dst_pages + i) * PAGE_WORDS
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < PAGE_WORDS
        words = tl.load(src0 + src_off + offs, mask=mask)
        tl.store(dst0 + dst_off + offs, words, mask=mask)
