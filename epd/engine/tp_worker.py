"""A tensor-parallel worker: rank r > 0 of an engine (`epd.engine.tensor_parallel` launches it).

    python -m epd.engine.tp_worker --rank R --size N --init file:///tmp/epd-tp-XXXX/store --config JSON

It joins the group, loads its shard of the language model and its KV pool, then does what the
leader's messages say until `TPStop`: run a step's forward (its logits go to the leader through the
gather inside the LM head), or give / take its heads of a request's KV for a hand-over. Messages are
`epd.tp_protocol`'s declared types, checked on receipt. It exits when its leader's process is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time

import torch

from epd.config import ModelConfig
from epd.engine.attention.cross import CrossStep, write_rows
from epd.engine.engine_core import EngineConfig
from epd.engine.engine_parts import make_backend, make_graphs, make_kv_cache
from epd.engine.rank_handover import RankKV
from epd.engine.tensor_parallel import (
    broadcast,
    gather_heads,
    init_group,
    rank_device,
    read_cross,
    read_graph_step,
    read_step,
    receive,
    scatter_heads,
)
from epd.kernels.fused_ops import fused_path
from epd.protocol import ProtocolError
from epd.tp_protocol import (
    TPCrossRows,
    TPDropKV,
    TPExpectKV,
    TPGatherKV,
    TPGraphStep,
    TPLandKV,
    TPLayerDone,
    TPOpenTransport,
    TPScatterKV,
    TPSendKV,
    TPStep,
    TPStop,
    array,
)

log = logging.getLogger("epd.tp_worker")


def _exit_with_parent() -> None:
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


class Worker:
    def __init__(self, config: EngineConfig, rank: int, size: int, init: str) -> None:
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.device = rank_device(config.resolved_device(), rank)
        self.group = init_group(rank, size, init, self.device)
        model_config = ModelConfig.from_pretrained(config.model_path)
        dtype = config.resolved_dtype(model_config)
        self.model = model_config.family.build_lm(self.device, dtype)
        if fused_path(self.model.lm_head.weight):
            self.model.fuse_projections()
        self.kv = make_kv_cache(config, model_config, self.model, self.device, dtype)
        self.backend = make_backend(config, model_config, self.model, self.device, dtype)
        future = torch.zeros(max(1, config.max_running_requests), dtype=torch.long, device=self.device)
        self.graphs = make_graphs(config, self.model, self.kv, self.backend, self.device, future)
        self.ranks = RankKV(self.group, self.kv.layers, self.device)   # rank-by-rank hand-overs
        self.handlers = {TPOpenTransport: self.ranks.open, TPExpectKV: self.ranks.expect,
                         TPLandKV: self.ranks.land, TPDropKV: self.ranks.drop}
        log.info("rank %d of %d: %s on %s, KV pool %d pages of %d heads", rank, size, model_config.model_id,
                 self.device, self.kv.pool.capacity, self.kv.spec.num_kv_heads)

    @torch.inference_mode()
    def step(self, msg: TPStep) -> None:
        ids, positions, meta = read_step(msg, self.device)
        embeds = self.model.embed(ids)
        if msg.spliced:   # the leader's embeddings, image rows spliced in
            broadcast(self.group, embeds)
        self.backend.plan(meta)
        cross = read_cross(msg)
        extra = {"cross": CrossStep(cross, self.kv.pool.cross_page_rows, self.device)} if cross is not None else {}
        hook = self.serve_layer if msg.hooked else None
        hidden = self.model(embeds, positions, self.backend, self.kv.layers, hook, **extra)
        self.model.logits(hidden[torch.tensor(msg.rows, dtype=torch.long, device=self.device)])

    @torch.inference_mode()
    def cross_rows(self, msg: TPCrossRows) -> None:
        states = torch.empty(msg.shape, dtype=self.model.lm_head.weight.dtype, device=self.device)
        broadcast(self.group, states)
        pages = array(msg.pages).tolist()
        for layer, k, v in self.model.cross_kv(states):
            write_rows(self.kv.layers[layer], pages, k, v)

    def serve_layer(self, layer: int) -> None:
        """Inside a hooked forward, after `layer`: the leader's KV gathers of it, until TPLayerDone."""
        while not isinstance(msg := receive(self.group), TPLayerDone):
            self.kv_op(msg)

    def kv_op(self, msg: TPGatherKV | TPScatterKV | TPSendKV) -> None:
        if isinstance(msg, TPSendKV):
            self.ranks.send(msg)
            return
        if not isinstance(msg, TPGatherKV | TPScatterKV):
            raise ProtocolError(f"tensor parallel worker: {type(msg).__name__} where a KV operation belongs")
        layers = [self.kv.layers[i] for i in msg.layers]
        pages = array(msg.pages).tolist()
        if isinstance(msg, TPGatherKV):
            gather_heads(self.group, layers, pages, msg.n, msg.first)
        else:
            wire = torch.empty(msg.shape, dtype=layers[0].dtype, device=self.device)
            scatter_heads(self.group, wire, layers, pages, msg.first)

    def serve(self) -> None:
        while True:
            try:
                msg = receive(self.group)
            except RuntimeError as e:   # the leader's connection closed: it ended without a stop
                log.info("rank %d: the leader is gone (%s); exiting", self.group.rank, str(e).splitlines()[0][:120])
                return
            if isinstance(msg, TPStop):
                self.ranks.close()
                return
            handler = self.handlers.get(type(msg))
            if handler is not None:
                handler(msg)
            elif isinstance(msg, TPStep):
                self.step(msg)
            elif isinstance(msg, TPCrossRows):
                self.cross_rows(msg)
            elif isinstance(msg, TPGraphStep):
                args = read_graph_step(msg)
                self.graphs.stage(*args)
                self.graphs.replay(args[0])
            else:
                self.kv_op(msg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--config", required=True, help="the leader's EngineConfig as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{args.rank} %(levelname)s %(message)s")
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    worker = Worker(EngineConfig(**json.loads(args.config)), args.rank, args.size, args.init)
    worker.serve()


if __name__ == "__main__":
    main()
