"""What every process of an engine builds the same way: its KV pool, its attention backend and its
CUDA-graph decode runner.

The engine core (and, under tensor parallelism, each of its worker processes) calls these once
after its language model is loaded. Under tensor parallelism a process's pool holds its share of
the KV heads; every process sizes its pool from its own memory and the group takes the smallest
page count, so that a page id names the same page in every process.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from epd.config import ModelConfig
from epd.engine.attention import flashinfer_backend
from epd.engine.attention.base import AttentionBackend
from epd.engine.attention.torch_backend import TorchAttentionBackend
from epd.engine.kv_pool import KVCache, KVCacheSpec
from epd.layers.parallel import tp_group

log = logging.getLogger(__name__)


def make_kv_cache(config: Any, model_config: ModelConfig, model: torch.nn.Module, device: torch.device,
                  dtype: torch.dtype) -> KVCache:
    """`config`: the engine's `EngineConfig`."""
    tc, group = model_config.text, tp_group()
    spec = KVCacheSpec(tc.num_layers, tc.num_kv_heads // group.size, tc.head_dim, config.page_size, dtype,
                       tuple(model.cross_layers))
    if config.kv_cache_tokens:
        pages = -(-config.kv_cache_tokens // spec.page_size) + 1
    elif device.type == "cuda" and config.gpu_memory_utilization is not None:
        pages = KVCache.pages_fitting(spec, share_left(config, model_config, device))
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # shared with other processes on this GPU
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # our cache
        pages = KVCache.pages_fitting(spec, int(free * config.mem_fraction))
    else:
        pages = KVCache.pages_fitting(spec, 1 << 30)  # 1 GiB of host memory by default
    if group.size > 1:
        import torch.distributed as dist

        fewest = torch.tensor([pages], dtype=torch.long)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN, group=group.cpu_group)
        pages = int(fewest.item())
    return KVCache(spec, pages, device)


def share_left(config: Any, model_config: ModelConfig, device: torch.device) -> int:
    """Bytes of --gpu-memory-utilization's share of the GPU not yet taken by this process (its
    weights), less room for a step's activations and the CUDA graphs."""
    _, total = torch.cuda.mem_get_info(device)
    share = int(total * config.gpu_memory_utilization)
    headroom = (1 << 30) + config.max_step_tokens * model_config.text.hidden_size * 64
    weights = torch.cuda.memory_allocated(device)
    if share - weights - headroom <= 0:
        raise ValueError(f"--gpu-memory-utilization {config.gpu_memory_utilization}: {share / 2**30:.1f} "
                         f"GiB do not hold the weights ({weights / 2**30:.1f} GiB) and a step's activations")
    return share - weights - headroom


def make_backend(config: Any, model_config: ModelConfig, model: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype) -> AttentionBackend:
    choice, tc, size = config.attention_backend, model_config.text, tp_group().size
    if choice not in ("auto", "torch", "flashinfer"):
        raise ValueError(f"attention_backend={choice!r}; expected auto, torch or flashinfer")
    reason = flashinfer_backend.supports(device, dtype, tc.head_dim)
    if reason is None and model.chunked_attention:
        reason = "chunked local attention is not written for it yet"
    if choice == "flashinfer" and reason is not None:
        raise ValueError(f"attention_backend='flashinfer': {reason}")
    if choice == "torch" or reason is not None:
        if device.type == "cuda":
            log.info("attention: torch backend (%s)", reason or "requested")
        return TorchAttentionBackend()
    log.info("attention: flashinfer backend")
    return flashinfer_backend.FlashInferBackend(tc.num_heads // size, tc.num_kv_heads // size, tc.head_dim,
                                                config.page_size, dtype, device)


def make_graphs(config: Any, model: torch.nn.Module, kv: KVCache, backend: AttentionBackend, device: torch.device,
                future: torch.Tensor, leader: Any = None) -> Any:
    """The captured decode graphs (`epd.engine.cuda_graph.CudaGraphDecodeRunner`), or None (a CPU,
    --disable-cuda-graph, or an attention backend no graph can take). Under tensor parallelism every
    rank calls this at start-up and captures the same buckets (their collectives inside)."""
    if config.disable_cuda_graph or device.type != "cuda":
        return None
    from epd.engine.cuda_graph import CudaGraphDecodeRunner, graph_source

    source = graph_source(backend, model, kv.spec, device)
    max_bs = min(config.cuda_graph_max_bs, config.max_running_requests)
    if source is None or max_bs < 1:
        return None
    graphs = CudaGraphDecodeRunner(model, kv, source, max_bs, future, leader)
    graphs.capture()
    return graphs
