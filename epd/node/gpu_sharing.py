"""A node's start-up check: does it share its GPU with other processes without CUDA MPS?

Without MPS the CUDA contexts of processes on one GPU take turns on it (time slices), which costs a
vision forward or a decode step many times its own time under load (BENCHMARKS.md). `epd serve`
starts MPS itself; nodes started otherwise (by hand, by Kubernetes) warn here so that the operator
knows to start it. Seen through `nvidia-smi` (inside a container it sees only the processes of
its PID namespace, so pods sharing a GPU may not see each other: the operator docs say so).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import torch

from kv_transfer.cuda_ipc import gpu_uuid

log = logging.getLogger(__name__)


def gpu_neighbours(device: torch.device) -> tuple[list[str], bool]:
    """(other processes computing on this GPU, whether an MPS server is among them)."""
    if device.type != "cuda" or shutil.which("nvidia-smi") is None:
        return [], False
    gpu = gpu_uuid(device.index if device.index is not None else torch.cuda.current_device())
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader",
                              f"--id={gpu}"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return [], False
    apps = [line.split(",", 1) for line in out.strip().splitlines() if "," in line]
    mps = any("mps-server" in name for _, name in apps)
    return [f"{pid.strip()} ({name.strip()})" for pid, name in apps if pid.strip() != str(os.getpid())], mps


def warn_if_shared_without_mps(device: torch.device | str, role: str) -> None:
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        return
    others, mps = gpu_neighbours(device)
    if others and not mps:
        log.warning("this %s node shares its GPU with %d other process(es) without CUDA MPS (%s): their kernels "
                    "take turns on the GPU, which costs latency under load; start MPS (nvidia-cuda-mps-control -d; "
                    "epd serve does it by itself)", role, len(others), ", ".join(others[:4]))
