"""Tensor parallelism across processes: the leader (the engine's own process, rank 0) and its group.

`--tensor-parallel-size N` makes one engine N processes: the engine core is rank 0, and
`TPLeader.start` launches ranks 1..N-1 (`python -m epd.engine.tp_worker`, one per GPU, or N CPU
processes), joins them in a torch.distributed group (NCCL for the tensors on GPUs, gloo on a CPU;
a gloo group always carries the leader's messages; the rendezvous is a file in a directory only
the user can open, and the group's sockets listen on loopback) and sets the process's `epd.layers.parallel`
group before any model is built. Each process loads its shard of the language model and a KV pool
of its share of the heads with the same page count, so a page id means the same page everywhere.

Only the leader schedules. For every forward it broadcasts one `TPStep` (`epd.tp_protocol`: the
step's token ids, positions, page tables, write slots, which rows sample, whether image
embeddings were spliced in, and for a cross-attention model the rows each token reads; before
that, `TPCrossRows` gives every rank a request's image rows to make its heads' K/V of); every rank
then embeds its vocabulary rows, takes the leader's spliced embeddings when there are any, runs the
same layers (the row-parallel projections sum over the group) and gathers the logits of the
sampling rows; the leader samples. For a hand-over the leader asks every rank for its heads of a
request's KV (`gather_kv`: the wire tensor has every head, as with one process) or gives them
theirs (`scatter_kv`), so the wire layout does not depend on either side's tensor-parallel size;
a prefill forward that streams KV groups as layers finish has every rank wait after each layer for
the leader's gathers of that layer (then `TPLayerDone`).
`TPStop` ends the workers; a worker also ends once its leader's process is gone, and the leader
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

import numpy as np
import torch

from epd import tp_protocol
from epd.engine.attention.base import StepMetadata
from epd.engine.attention.cross import CrossChunk
from epd.layers.parallel import TPGroup, set_group
from epd.tp_protocol import (
    TPCrossChunk,
    TPCrossRows,
    TPGatherKV,
    TPGraphCross,
    TPGraphStep,
    TPLayerDone,
    TPScatterKV,
    TPStep,
    TPStop,
    array,
    ints,
)
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
    """The device of `rank` (GPU first + r of those visible, `device` being cuda:first; a CPU for all)."""
    if device.type != "cuda":
        return device
    dev = torch.device("cuda", (device.index or 0) + rank)
    torch.cuda.set_device(dev)
    return dev


def send(group: TPGroup, msg: Any) -> None:
    """A declared `epd.tp_protocol` message from the leader to every other rank."""
    import torch.distributed as dist

    payload = tp_protocol.encode(msg)
    dist.broadcast(torch.tensor([len(payload)], dtype=torch.long), src=0, group=group.cpu_group)
    dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=group.cpu_group)


def receive(group: TPGroup) -> Any:
    """The leader's next message, checked (`tp_protocol.decode`)."""
    import torch.distributed as dist

    length = torch.zeros(1, dtype=torch.long)
    dist.broadcast(length, src=0, group=group.cpu_group)
    payload = torch.empty(int(length.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=group.cpu_group)
    return tp_protocol.decode(payload.numpy().tobytes())


def broadcast(group: TPGroup, tensor: torch.Tensor) -> torch.Tensor:
    """The leader's `tensor` in every rank (in place)."""
    import torch.distributed as dist

    dist.broadcast(tensor, src=0, group=group.group)
    return tensor


def _tables(page_tables: Sequence[Any]) -> dict[str, Any]:
    """The `table_lens` / `tables` fields of a step message."""
    arrays = [np.asarray(t, dtype=np.int64) for t in page_tables]
    return {"table_lens": [len(t) for t in arrays], "tables": ints(np.concatenate(arrays) if arrays else [])}


def read_tables(msg: TPStep | TPGraphStep) -> list[np.ndarray]:
    """The page tables of a step message (int32 arrays, as `Request.page_array()`)."""
    flat, tables, start = array(msg.tables), [], 0
    for n in msg.table_lens:
        tables.append(flat[start:start + n].astype(np.int32))
        start += n
    return tables


def step_message(ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata, rows: list[int],
                 spliced: bool, cross: list[CrossChunk] | None = None, hooked: bool = False) -> TPStep:
    return TPStep(ids=ints(ids.cpu()), positions=ints(positions.cpu()), position_rows=int(positions.shape[0]),
                  rows=rows, qo_lens=list(meta.qo_lens), kv_lens=list(meta.kv_lens), page_size=meta.page_size,
                  slots=ints(meta.write_slots.cpu()), spliced=spliced, hooked=hooked,
                  cross=[_cross_chunk(c) for c in cross] if cross is not None else None,
                  **_tables(meta.page_tables))


def _bits(mask: torch.Tensor) -> bytes:
    return np.packbits(mask.numpy().reshape(-1)).tobytes()


def _unbits(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=int(np.prod(shape)))
    return torch.from_numpy(flat.astype(bool).reshape(shape))


def _cross_chunk(c: CrossChunk) -> TPCrossChunk:
    if c.visible is None:
        return TPCrossChunk(c.q_len)
    return TPCrossChunk(c.q_len, int(c.visible.shape[1]), ints(list(c.pages)), _bits(c.visible), _bits(c.sees))


def read_cross(msg: TPStep) -> list[CrossChunk] | None:
    """The step's cross-attention chunks (a cross-attention model's step with image rows), else None."""
    if msg.cross is None:
        return None
    return [CrossChunk(c.q, array(c.pages).tolist(), _unbits(c.visible, (c.q, c.rows)), _unbits(c.sees, (c.q,)))
            if c.rows else CrossChunk(c.q) for c in msg.cross]


def read_graph_step(msg: TPGraphStep) -> tuple[Any, ...]:
    """`CudaGraphDecodeRunner.stage`'s arguments from a graph step."""
    cross = [(c.pages, [tuple(seg) for seg in c.segments], c.sees) for c in msg.cross] \
        if msg.cross is not None else None
    return (msg.bs, array(msg.ids).tolist(), array(msg.positions).reshape(msg.position_rows, -1),
            array(msg.slots), list(msg.kv_lens), read_tables(msg), cross)


def read_step(msg: TPStep, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
    """(token ids, positions, attention metadata) of a step, on `device`."""
    ids = torch.from_numpy(array(msg.ids).copy()).to(device)
    positions = torch.from_numpy(array(msg.positions).reshape(msg.position_rows, -1).copy()).to(device)
    slots = torch.from_numpy(array(msg.slots).copy()).to(device)
    return ids, positions, StepMetadata(list(msg.qo_lens), list(msg.kv_lens), read_tables(msg), msg.page_size, slots)


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
        the other ranks take the leader's messages (its hook's `gather_kv`) until `TPLayerDone`."""
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
                send(self.group, TPLayerDone())
        return after_layer

    def graph_step(self, bs: int, ids: list[int], positions: np.ndarray, slots: np.ndarray, kv_lens: list[int],
                   tables: list[np.ndarray], cross: list | None) -> None:
        """A CUDA-graph decode step's staged inputs (`CudaGraphDecodeRunner.stage`), for every rank
        to replay bucket `bs` with."""
        self.check_alive()
        rows = [TPGraphCross(list(map(int, pages)), [list(seg) for seg in segments], bool(sees))
                for pages, segments, sees in cross] if cross is not None else None
        send(self.group, TPGraphStep(bs=bs, ids=ints(ids), positions=ints(positions),
                                     position_rows=int(positions.shape[0]), slots=ints(slots), kv_lens=kv_lens,
                                     cross=rows, **_tables(tables)))

    def cross_rows(self, states: torch.Tensor, pages: Sequence[int]) -> None:
        """Image rows (the encoder's output [R, H]) to every rank, which writes its heads' K/V of them
        into `pages` of its cross-attention layers (the leader writes its own after this)."""
        self.check_alive()
        with self.stepping():
            send(self.group, TPCrossRows(ints(list(pages)), list(states.shape)))
            broadcast(self.group, states.contiguous())

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return broadcast(self.group, tensor)

    def send(self, msg: Any) -> None:
        """A declared `epd.tp_protocol` message to every other rank (`epd.engine.rank_handover`)."""
        send(self.group, msg)

    def gather_kv(self, layer_ids: list[int], pages: Sequence[int], num_tokens: int, first: int = 0) -> torch.Tensor:
        self.check_alive()
        with self.stepping():
            send(self.group, TPGatherKV(list(layer_ids), ints(list(pages)), num_tokens, first))
            return gather_heads(self.group, [self.layers[i] for i in layer_ids], pages, num_tokens, first)

    def scatter_kv(self, wire: torch.Tensor, layer_ids: list[int], pages: Sequence[int], first: int = 0) -> None:
        self.check_alive()
        with self.stepping():
            send(self.group, TPScatterKV(list(layer_ids), ints(list(pages)), first, list(wire.shape)))
            scatter_heads(self.group, wire.contiguous(), [self.layers[i] for i in layer_ids], pages, first)

    def stop(self, kill: bool = False) -> None:
        """End the workers (each exits after the message; `kill`: at once) and leave the group;
        idempotent."""
        import torch.distributed as dist

        if self.workers and not kill and all(w.poll() is None for w in self.workers):
            send(self.group, TPStop())
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
