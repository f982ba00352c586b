"""Put on PYTHONPATH of the node processes of `test_kv_ipc`'s fallback test: opening any CUDA IPC
handle fails in them, as it does for a pool on a GPU the process cannot reach."""

import torch


def _refuse(*args: object, **kwargs: object) -> None:
    raise RuntimeError("cudaIpcOpenMemHandle failed: invalid argument (refused by tests/gpu/ipc_unmappable)")


torch.UntypedStorage._new_shared_cuda = staticmethod(_refuse)
