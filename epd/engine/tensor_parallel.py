"""Tensor parallelism across processes: the leader (the engine's own process, rank 0) and its group.

`--tensor-parallel-size N` makes one engine N processes: the engine core is rank 0, and
`TPLeader.start` launches ranks 1..N-1 (`python -m epd.engine.tp_worker`, one per GPU, or N CPU
processes), joins them in a torch.distributed group (NCCL for the tensors on GPUs, gloo on a CPU;
a gloo group always carries the leader's messages; the rendezvous is a file in a directory only
the user can open, and the group's sockets listen on loopback) and sets the process's `epd.layers.parallel`
group before any model is built. Each process loads its shard of the language model and a KV pool
of its share of the heads with the same page count, so a page id means the same page everywhere.

Only the leader schedules. For every forward it broadcasts one `step` message (msgpack: the
step's token ids, positions, page tables, write slots, which rows sample, whether image
embeddings were spliced in, and for a cross-attention model the rows each token reads; before
that, `cross_rows` gives every rank a request's image rows to make its heads' K/V of); every rank
then embeds its vocabulary rows, takes the leader's spliced embeddings when there are any, runs the
same layers (the row-parallel projections sum over the group) and gathers the logits of the
sampling rows; the leader samples. For a hand-over the leader asks every rank for its heads of a
request's KV (`gather_kv`: the wire tensor has every head, as with one process) or gives them
theirs (`scatter_kv`), so the wire layout does not depend on either side's tensor-parallel size;
a prefill forward that streams KV groups as layers finish has every rank wait after each layer for
the leader's gathers of that layer (then `layer_done`).
`stop` ends the workers; a worker also ends once its leader's process is gone, and the leader
stops (`GroupLost`) once a worker's is.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgpack
import numpy as np
import torch

from epd.engine.attention.base import StepMetadata
from epd.engine.attention.cross import CrossChunk
from epd.layers.parallel import TPGroup, set_group
from kv_transfer.kv_codec import gather_kv, scatter_kv

_IDLE_FOREVER = datetime.timedelta(days=365)   # a worker waits for the next step as long as the node lives


def init_group(rank: int, size: int, init: str, device: torch.device) -> TPGroup:
    """Join the group; set and return it (device: this rank's)."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):   # one host: nothing listens beyond loopback
        os.environ.setdefault(name, "lo")
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size, timeout=_IDLE_FOREVER)
    cpu = dist.new_group(backend="gloo", timeout=_IDLE_FOREVER) if backend != "gloo" else dist.group.WORLD
    group = TPGroup(rank, size, dist.group.WORLD, cpu)
    set_group(group)
    return group


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of `rank` (GPU r of those visible; a CPU for all)."""
    if device.type != "cuda":
        return device
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    return dev


def send(group: TPGroup, msg: dict[str, Any]) -> None:
    import torch.distributed as dist

    payload = msgpack.packb(msg, use_bin_type=True)
    dist.broadcast(torch.tensor([len(payload)], dtype=torch.long), src=0, group=group.cpu_group)
    dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=group.cpu_group)


def receive(group: TPGroup) -> dict[str, Any]:
    import torch.distributed as dist

    length = torch.zeros(1, dtype=torch.long)
    dist.broadcast(length, src=0, group=group.cpu_group)
    payload = torch.empty(int(length.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=group.cpu_group)
    msg = msgpack.unpackb(payload.numpy().tobytes(), raw=False)
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ValueError("tensor parallel: a message without an op")
    return msg


def broadcast(group: TPGroup, tensor: torch.Tensor) -> torch.Tensor:
    """The leader's `tensor` in every rank (in place)."""
    import torch.distributed as dist

    dist.broadcast(tensor, src=0, group=group.group)
    return tensor


def _ints(values: Any) -> bytes:
    return np.ascontiguousarray(values, dtype=np.int64).tobytes()


def _array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int64)


def step_message(ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata, rows: list[int],
                 spliced: bool, cross: list[CrossChunk] | None = None, hooked: bool = False) -> dict[str, Any]:
    tables = [np.asarray(t, dtype=np.int64) for t in meta.page_tables]
    return {"op": "step", "ids": _ints(ids.cpu()), "positions": _ints(positions.cpu()), "rows": rows,
            "position_rows": int(positions.shape[0]), "qo_lens": list(meta.qo_lens), "kv_lens": list(meta.kv_lens),
            "table_lens": [len(t) for t in tables], "tables": _ints(np.concatenate(tables) if tables else []),
            "page_size": meta.page_size, "slots": _ints(meta.write_slots.cpu()), "spliced": spliced,
            "cross": [_cross_chunk(c) for c in cross] if cross is not None else None, "hooked": hooked}


def _bits(mask: torch.Tensor) -> bytes:
    return np.packbits(mask.numpy().reshape(-1)).tobytes()


def _unbits(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=int(np.prod(shape)))
    return torch.from_numpy(flat.astype(bool).reshape(shape))


def _cross_chunk(c: CrossChunk) -> dict[str, Any]:
    if c.visible is None:
        return {"q": c.q_len}
    return {"q": c.q_len, "pages": _ints(list(c.pages)), "rows": int(c.visible.shape[1]), "visible": _bits(c.visible),
            "sees": _bits(c.sees)}


def read_cross(msg: dict[str, Any]) -> list[CrossChunk] | None:
    """The step's cross-attention chunks (a cross-attention model's step with image rows), else None."""
    if msg["cross"] is None:
        return None
    chunks = []
    for c in msg["cross"]:
        if "pages" not in c:
            chunks.append(CrossChunk(c["q"]))
            continue
        q = c["q"]
        chunks.append(CrossChunk(q, _array(c["pages"]).tolist(), _unbits(c["visible"], (q, c["rows"])),
                                 _unbits(c["sees"], (q,))))
    return chunks


def read_tables(msg: dict[str, Any]) -> list[np.ndarray]:
    """The page tables of a `step` or `graph` message (int32 arrays, as `Request.page_array()`)."""
    flat, tables, start = _array(msg["tables"]), [], 0
    for n in msg["table_lens"]:
        tables.append(flat[start:start + n].astype(np.int32))
        start += n
    return tables


def read_graph_step(msg: dict[str, Any]) -> tuple[Any, ...]:
    """`CudaGraphDecodeRunner.stage`'s arguments from a `graph` message."""
    cross = [(pages, [tuple(seg) for seg in segments], sees) for pages, segments, sees in msg["cross"]] \
        if msg["cross"] is not None else None
    return (msg["bs"], _array(msg["ids"]).tolist(), _array(msg["positions"]).reshape(msg["position_rows"], -1),
            _array(msg["slots"]), list(msg["kv_lens"]), read_tables(msg), cross)


def read_step(msg: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
    """(token ids, positions, attention metadata) of a `step` message, on `device`."""
    ids = torch.from_numpy(_array(msg["ids"]).copy()).to(device)
    positions = torch.from_numpy(_array(msg["positions"]).reshape(msg["position_rows"], -1).copy()).to(device)
    tables = read_tables(msg)
    slots = torch.from_numpy(_array(msg["slots"]).copy()).to(device)
    return ids, positions, StepMetadata(list(msg["qo_lens"]), list(msg["kv_lens"]), tables, msg["page_size"], slots)


def gather_heads(group: TPGroup, layers: list[torch.Tensor], pages: Sequence[int], num_tokens: int,
                 first: int) -> torch.Tensor:
    """Every rank's heads of `layers`' KV, as one wire tensor [L, 2, n, heads, D] (rank order)."""
    import torch.distributed as dist

    local = gather_kv(layers, list(pages), num_tokens, first=first).contiguous()
    parts = [torch.empty_like(local) for _ in range(group.size)]
    dist.all_gather(parts, local, group=group.group)
    return torch.cat(parts, dim=3)


def scatter_heads(group: TPGroup, wire: torch.Tensor, layers: list[torch.Tensor], pages: Sequence[int],
                  first: int) -> None:
    """This rank's heads of the leader's wire tensor (broadcast into `wire`) into `layers`' pages."""
    broadcast(group, wire)
    heads = layers[0].shape[3]
    scatter_kv(wire[:, :, :, group.rank * heads:(group.rank + 1) * heads].contiguous(), layers, list(pages), first)


class GroupLost(SystemExit):
    """A rank of the group is gone: the node exits (a supervisor or Kubernetes starts it again) rather
    than fail every request from now on."""


class TPLeader:
    """Rank 0's side of the group: launches the workers, sends them the step and the KV operations."""

    def __init__(self, group: TPGroup, workers: list[subprocess.Popen], layers: list[torch.Tensor] | None = None,
                 rendezvous: str = "") -> None:
        self.group, self.workers, self.rendezvous = group, workers, rendezvous
        self.layers = layers or []   # this process's KV pool layers (set once the pool exists)

    @classmethod
    def start(cls, config: Any, device: torch.device) -> tuple[TPLeader, torch.device]:
        """Launch ranks 1..N-1 of `config` (an EngineConfig) and join them; (leader, rank 0's device)."""
        size = config.tensor_parallel_size
        # the rendezvous is a file in a directory only this user can open (a TCP store would let any
        # local process join the group first and read the steps); the group's own sockets use loopback
        rendezvous = tempfile.mkdtemp(prefix="epd-tp-")
        init = f"file://{os.path.join(rendezvous, 'store')}"
        spec = json.dumps(dataclasses.asdict(config))
        workers = [subprocess.Popen([sys.executable, "-m", "epd.engine.tp_worker", "--rank", str(rank),
                                     "--size", str(size), "--init", init, "--config", spec])
                   for rank in range(1, size)]
        device = rank_device(device, 0)
        try:
            leader = cls(init_group(0, size, init, device), workers, rendezvous=rendezvous)
            atexit.register(leader.stop)   # a process that ends without stopping its engine ends its workers
            return leader, device
        except BaseException:
            for w in workers:
                w.kill()
            shutil.rmtree(rendezvous, ignore_errors=True)
            raise

    def check_alive(self) -> None:
        """Raise `GroupLost` (the process exits) when a worker has exited: the model is incomplete."""
        for rank, w in enumerate(self.workers, start=1):
            if w.poll() is not None:
                code = w.returncode
                self.stop(kill=True)
                raise GroupLost(f"tensor parallel rank {rank} exited (code {code}): this process cannot run the "
                                f"model without it and stops")

    def step(self, ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata, rows: list[int],
             spliced: bool, cross: list[CrossChunk] | None = None, hooked: bool = False) -> None:
        """`hooked`: the forward calls a layer hook (a prefill streaming KV groups): after each layer
        the other ranks take the leader's messages (its hook's `gather_kv`) until `layer_done`."""
        self.check_alive()
        send(self.group, step_message(ids, positions, meta, rows, spliced, cross, hooked))

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """Around a step or an operation of the group: an error in it (other than `GroupLost`) may have
        left the ranks at different collectives, so the workers are ended and `GroupLost` raised."""
        try:
            yield
        except GroupLost:
            raise
        except BaseException as e:
            self.stop(kill=True)
            raise GroupLost(f"tensor parallel: a step failed on rank 0 ({type(e).__name__}: {e}); the other ranks "
                            f"are out of step with it, so this process stops") from e

    def layer_hook(self, hook: Callable[[int], None]) -> Callable[[int], None]:
        """`hook` for the leader's forward of a `hooked` step: then tell the ranks the layer is done."""
        def after_layer(layer: int) -> None:
            try:
                hook(layer)
            finally:
                send(self.group, {"op": "layer_done"})
        return after_layer

    def graph_step(self, bs: int, ids: list[int], positions: np.ndarray, slots: np.ndarray, kv_lens: list[int],
                   tables: list[np.ndarray], cross: list | None) -> None:
        """A CUDA-graph decode step's staged inputs (`CudaGraphDecodeRunner.stage`), for every rank
        to replay bucket `bs` with."""
        self.check_alive()
        arrays = [np.asarray(t, dtype=np.int64) for t in tables]
        send(self.group, {"op": "graph", "bs": bs, "ids": _ints(ids), "positions": _ints(positions),
                          "position_rows": int(positions.shape[0]), "slots": _ints(slots), "kv_lens": kv_lens,
                          "table_lens": [len(t) for t in arrays],
                          "tables": _ints(np.concatenate(arrays) if arrays else []),
                          "cross": [[list(map(int, pages)), [list(seg) for seg in segments], bool(sees)]
                                    for pages, segments, sees in cross] if cross is not None else None})

    def cross_rows(self, states: torch.Tensor, pages: Sequence[int]) -> None:
        """Image rows (the encoder's output [R, H]) to every rank, which writes its heads' K/V of them
        into `pages` of its cross-attention layers (the leader writes its own after this)."""
        self.check_alive()
        with self.stepping():
            send(self.group, {"op": "cross_rows", "pages": _ints(list(pages)), "shape": list(states.shape)})
            broadcast(self.group, states.contiguous())

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return broadcast(self.group, tensor)

    def gather_kv(self, layer_ids: list[int], pages: Sequence[int], num_tokens: int, first: int = 0) -> torch.Tensor:
        self.check_alive()
        with self.stepping():
            send(self.group, {"op": "gather_kv", "layers": layer_ids, "pages": _ints(pages), "n": num_tokens,
                              "first": first})
            return gather_heads(self.group, [self.layers[i] for i in layer_ids], pages, num_tokens, first)

    def scatter_kv(self, wire: torch.Tensor, layer_ids: list[int], pages: Sequence[int], first: int = 0) -> None:
        self.check_alive()
        with self.stepping():
            send(self.group, {"op": "scatter_kv", "layers": layer_ids, "pages": _ints(pages), "first": first,
                              "shape": list(wire.shape)})
            scatter_heads(self.group, wire.contiguous(), [self.layers[i] for i in layer_ids], pages, first)

    def stop(self, kill: bool = False) -> None:
        """End the workers (each exits after the message; `kill`: at once) and leave the group;
        idempotent."""
        import torch.distributed as dist

        if self.workers and not kill and all(w.poll() is None for w in self.workers):
            send(self.group, {"op": "stop"})
        for w in self.workers:
            if kill:
                w.kill()
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
        self.workers = []
        if dist.is_initialized():
            dist.destroy_process_group()
        set_group(TPGroup())
        if self.rendezvous:
            shutil.rmtree(self.rendezvous, ignore_errors=True)
