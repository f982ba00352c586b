"""`epd colocated --model DIR --redis-url URL [--host H] [--port P] [--device cpu|cuda]`: one node that
encodes, prefills and decodes (a member of the colocated pool the router balances over)."""

from __future__ import annotations

from colocated_node.service import ColocatedService
from epd.config import load_tokenizer
from epd.engine.engine_core import EngineConfig, EngineCore
from epd.node.node_loop import run_node
from epd.node.runtime import NodeArgs, NodeRuntime, setup_logging


def main(argv: list[str] | None = None) -> int:
    args = NodeArgs.from_cli("colocated", argv)
    setup_logging(args.log_level)
    core = EngineCore(EngineConfig(model_path=args.model, **args.engine), load_tokenizer(args.model))
    service = ColocatedService(core)
    runtime = NodeRuntime(args, str(core.device), layout=None, capacity=service.engine.capacity,
                          max_context=core.max_context)
    service.runtime = runtime
    run_node(runtime, service)
    return 0
