"""`epd prefill --model DIR --redis-url URL [--host H] [--port P] [--device cpu|cuda] [--layer-group-size N]`."""

from __future__ import annotations

from epd.config import load_tokenizer
from epd.engine.engine_core import EngineConfig, EngineCore
from epd.node.embedding_arena import EmbeddingArena
from epd.node.node_loop import run_node
from epd.node.runtime import NodeArgs, NodeRuntime, kv_layout_of, setup_logging
from kv_transfer.cuda_ipc import ipc_capability
from kv_transfer.rooms import RoomStore
from prefill_node.service import PrefillService


def main(argv: list[str] | None = None) -> int:
    args = NodeArgs.from_cli("prefill", argv)
    setup_logging(args.log_level)
    core = EngineCore(EngineConfig(model_path=args.model, load_vision=False, **args.engine),
                      load_tokenizer(args.model))
    layout = kv_layout_of(core)
    service = PrefillService(core, layout, args.layer_group_size, kv_timeout_s=args.kv_timeout)
    engine = service.engine
    # CUDA IPC maps one process's pool: a node over several processes (tensor parallel) hands over through UCX
    ipc = ipc_capability(core.device, engine.page_size) if engine.tensor_parallel_size == 1 else ""
    runtime = NodeRuntime(args, str(core.device), layout, capacity=engine.capacity, kv_ipc=ipc,
                          max_context=core.max_context, tp_leader=core.tp)
    service.runtime = runtime
    if ipc and args.kv_ipc and args.embedding_arena_tokens > 0:   # encoders write embeddings into it through IPC
        service.arena = EmbeddingArena(args.embedding_arena_tokens, core.model_config.text.hidden_size, core.dtype,
                                       core.device, owner=runtime.node_id, fence_timeout_s=args.kv_timeout)
    service.rooms = RoomStore(runtime.redis)
    run_node(runtime, service)
    return 0
