"""Same-host GPU KV hand-over through CUDA IPC: the prefill node writes a request's KV straight
into the pages the decode node reserved for it, one read and one write per byte, in one kernel.

The UCX path moves a request's KV three times (gather into a wire tensor, UCX copy, scatter into
pages) and pays ~1 ms of fixed latency per message (BENCHMARKS.md section 4). When prefill can map
decode's pool and both share a page size, this path replaces it (decode pre-allocates, prefill
writes, as in SGLang's and Mooncake's disaggregation):

1. `ipc_capability()` is what a node publishes in its registry record (`IpcCapability.to_wire`):
   its host key (`host_key()`: boot id + IPC namespace), page size, the UUID of the GPU its pool
   lives on and the UUIDs of every GPU it can see (CUDA_VISIBLE_DEVICES narrows them, as in a pod).
   The router pairs two nodes through CUDA IPC only when `ipc_pairable(prefill, decode)`.
2. Decode: `export_pool(layers)` once -> a msgpack-able descriptor (CUDA IPC handles of every
   layer tensor, plus dtype, shape and the pool's GPU). When it reserves a request's pages it sends
   the descriptor and the page ids to the prefill node, long before prefill finishes.
3. Prefill: `PoolImports.writer(desc, layers)` maps the peer's pool once (on its own GPU's context)
   and caches a `PageWriter` (the layer-offset table is built once per pool pair); `PageWriter.copy`
   queues the copy of the request's pages into decode's right behind the last layer on the GPU
   (`write` also waits for it), then prefill frees its own pages and tells decode the KV is in
   place. A pool that cannot be mapped or written is remembered (`PoolImports.unusable`): the
   prefill node hands its KV over the wire instead (`epd.node.ipc_handover`).

Handles are plain bytes/ints/strings in msgpack; nothing is pickled.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass
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


CAPABILITY_VERSION = "ipc2"
MAX_CAPABILITY_CHARS = 4096     # it travels in the Redis registry record
MAX_VISIBLE_GPUS = 64           # 8 GPUs of 7 MIG instances each fit
_HOST_KEY = re.compile(r"[^;,\s]{1,256}")
_GPU_UUID = re.compile(r"[A-Za-z0-9/_-]{1,96}")


@dataclass(frozen=True)
class IpcCapability:
    """Where a node's KV pool lives, as far as CUDA IPC cares."""

    host: str                   # host_key(): boot id + IPC namespace
    page_size: int
    gpu: str                    # UUID of the GPU holding the node's KV pool
    visible: tuple[str, ...]    # UUIDs of every GPU this process can see (it may map memory on these)

    def to_wire(self) -> str:
        """`ipc2;HOST;PAGE_SIZE;GPU;VISIBLE,VISIBLE,...` (parsed back by `parse`)."""
        return ";".join([CAPABILITY_VERSION, self.host, str(self.page_size), self.gpu, ",".join(self.visible)])

    @classmethod
    def parse(cls, text: str) -> IpcCapability | None:
        """The capability in `text`, or None when it is empty, malformed, too long or of another
        version (an older node's "host/page-size": such a node never pairs through CUDA IPC)."""
        if not text or len(text) > MAX_CAPABILITY_CHARS:
            return None
        parts = text.split(";")
        if len(parts) != 5 or parts[0] != CAPABILITY_VERSION:
            return None
        _, host, page_size, gpu, visible = parts
        gpus = tuple(visible.split(",")) if visible else ()
        if not _HOST_KEY.fullmatch(host) or not page_size.isdigit() or int(page_size) <= 0 \
                or not _GPU_UUID.fullmatch(gpu) or len(gpus) > MAX_VISIBLE_GPUS \
                or not all(_GPU_UUID.fullmatch(g) for g in gpus):
            return None
        return cls(host, int(page_size), gpu, gpus)


def ipc_writable(writer_capability: str, owner_capability: str) -> bool:
    """Whether the writer's process can open the owner's GPU memory and write into it: one host key
    (machine and IPC namespace) and the owner's pool on a GPU the writer sees. Either may be ""."""
    writer, owner = IpcCapability.parse(writer_capability), IpcCapability.parse(owner_capability)
    return writer is not None and owner is not None and writer.host == owner.host and owner.gpu in writer.visible


def ipc_pairable(prefill_capability: str, decode_capability: str) -> bool:
    """Whether the prefill node can write the KV straight into the decode node's pages: writable
    (`ipc_writable`) and one page size."""
    prefill, decode = IpcCapability.parse(prefill_capability), IpcCapability.parse(decode_capability)
    return ipc_writable(prefill_capability, decode_capability) and prefill.page_size == decode.page_size


def gpu_uuid(index: int) -> str:
    """The UUID of this process's CUDA device `index`, as nvidia-smi and CUDA_VISIBLE_DEVICES write it."""
    uuid_ = str(torch.cuda.get_device_properties(index).uuid)
    return uuid_ if uuid_.startswith(("GPU-", "MIG-")) else f"GPU-{uuid_}"


def visible_gpus() -> tuple[str, ...]:
    """The UUIDs of every GPU this process can see (after CUDA_VISIBLE_DEVICES), by device index."""
    if not torch.cuda.is_available():
        return ()
    return tuple(gpu_uuid(i) for i in range(torch.cuda.device_count()))


def ipc_capability(device: torch.device | str, page_size: int) -> str:
    """What a node advertises: "" when it cannot take part (not CUDA), else `IpcCapability.to_wire`."""
    device = torch.device(device)
    if device.type != "cuda":
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = visible_gpus()[:MAX_VISIBLE_GPUS]
    return IpcCapability(host_key(), page_size, gpu_uuid(index), visible).to_wire()


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
            "gpu": gpu_uuid(first.device.index if first.device.index is not None else torch.cuda.current_device()),
            "dtype": str(first.dtype).removeprefix("torch."), "shape": list(first.shape), "handles": handles}


def _plain(x: Any) -> Any:
    if isinstance(x, bool | int | bytes | str) or x is None:
        return x
    if isinstance(x, torch.device):
        return x.index
    raise TypeError(f"unexpected IPC field {type(x).__name__}")


class PoolImports:
    """Peer pools mapped into this process, by descriptor id (mapped once, kept until `drop`), and
    those that could not be mapped or written (`unusable`: not tried again until `drop`)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._pools: dict[str, list[torch.Tensor]] = {}
        self._owners: dict[str, str] = {}
        self._writers: dict[str, PageWriter] = {}
        self._unusable: dict[str, str] = {}   # pool id -> why

    def layers(self, desc: dict[str, Any]) -> list[torch.Tensor]:
        """The peer pool's layer tensors, mapped on this process's device (peer access when the
        pool is on another GPU that this process sees)."""
        pool = self._pools.get(desc["id"])
        if pool is None:
            self._owners[desc["id"]] = desc.get("owner", "")
            if desc["host"] != host_key():
                raise ValueError(f"pool {desc['id']} is on another host or IPC namespace")
            gpu = desc.get("gpu", "")
            if gpu and gpu not in visible_gpus():
                raise ValueError(f"pool {desc['id']} is on GPU {gpu}, which this process cannot see")
            dtype, shape = _DTYPES[desc["dtype"]], tuple(desc["shape"])
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            with torch.cuda.device(index):
                pool = [_map(fields, dtype, shape, index) for fields in desc["handles"]]
            self._pools[desc["id"]] = pool
        return pool

    def writer(self, desc: dict[str, Any], local_layers: list[torch.Tensor]) -> PageWriter:
        """A writer from our `local_layers` into the peer pool `desc` (mapped on first use); raises
        at once for a pool found `unusable` before."""
        why = self._unusable.get(desc["id"])
        if why is not None:
            raise RuntimeError(why)
        writer = self._writers.get(desc["id"])
        if writer is None:
            writer = self._writers[desc["id"]] = PageWriter(local_layers, self.layers(desc))
        return writer

    def mapped(self, desc: dict[str, Any]) -> torch.Tensor:
        """The peer's one exported tensor (an embedding arena), mapped on first use; raises at once
        for one found `unusable` before."""
        why = self._unusable.get(desc["id"])
        if why is not None:
            raise RuntimeError(why)
        return self.layers(desc)[0]

    def mark_unusable(self, desc: dict[str, Any], why: str) -> bool:
        """Stop using the pool `desc` (mapping or writing it failed); True the first time."""
        first = desc["id"] not in self._unusable
        self._unusable.setdefault(desc["id"], why)
        self._owners.setdefault(desc["id"], desc.get("owner", ""))
        self._writers.pop(desc["id"], None)
        self._pools.pop(desc["id"], None)
        return first

    def drop(self, pool_id: str) -> None:
        self._writers.pop(pool_id, None)
        self._pools.pop(pool_id, None)
        self._owners.pop(pool_id, None)
        self._unusable.pop(pool_id, None)

    def drop_orphans(self, live_owners: set[str]) -> list[str]:
        """Unmap the pools of nodes that are gone (their GPU memory stays allocated while mapped)."""
        gone = [pid for pid, owner in self._owners.items() if owner not in live_owners]
        for pid in gone:
            self.drop(pid)
        return gone

    def __len__(self) -> int:
        """Pools known here: mapped, or marked unusable (both are forgotten once their owner is gone)."""
        return len(self._owners)


def _map(fields: list[Any], dtype: torch.dtype, shape: tuple[int, ...], index: int) -> torch.Tensor:
    """One exported storage opened in device `index`'s context (its first field, the exporter's own
    device index, means another GPU in this process's numbering)."""
    storage = torch.UntypedStorage._new_shared_cuda(index, *fields[1:])
    out = torch.empty(0, dtype=dtype, device=torch.device("cuda", index))
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
