"""`epd encoder --model DIR --redis-url URL [--host H] [--port P] [--device cpu|cuda]`."""

from __future__ import annotations

from encoder_node.service import EncoderService
from epd.config import ModelConfig
from epd.engine.engine_core import EngineConfig
from epd.models.loader import select_device
from epd.node.node_loop import run_node
from epd.node.runtime import NodeArgs, NodeRuntime, setup_logging
from kv_transfer.cuda_ipc import ipc_capability


def main(argv: list[str] | None = None) -> int:
    args = NodeArgs.from_cli("encoder", argv)
    setup_logging(args.log_level)
    config = ModelConfig.from_pretrained(args.model)
    engine_cfg = EngineConfig(model_path=args.model, device=args.engine["device"], dtype=args.engine["dtype"])
    device = select_device(engine_cfg.resolved_device())
    service = EncoderService(config, str(device), engine_cfg.resolved_dtype(config),
                             max_batch_image_tokens=args.max_batch_image_tokens)
    runtime = NodeRuntime(args, str(device), layout=None, capacity=service.max_batch_images,
                          kv_ipc=ipc_capability(device, 1))   # prefill nodes' arenas it may write into
    service.runtime = runtime
    run_node(runtime, service)
    return 0
