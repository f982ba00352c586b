"""Which nodes may hand KV over through CUDA IPC: processes that share a machine and an IPC
namespace (one `epd serve`), not pods that only share a machine."""

from __future__ import annotations

import os
import subprocess
import sys

from kv_transfer.cuda_ipc import host_key


def test_cuda_ipc_pairs_only_processes_of_one_ipc_namespace(tmp_path):
    """Pods on one machine share its boot id but not an IPC namespace: their host keys differ."""
    here = host_key()
    assert os.readlink("/proc/self/ns/ipc") in here
    same = subprocess.run([sys.executable, "-c", "from kv_transfer.cuda_ipc import host_key; print(host_key())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert same == here
    if os.geteuid() == 0 and subprocess.run(["unshare", "--ipc", "true"], capture_output=True).returncode == 0:
        other = subprocess.run(["unshare", "--ipc", sys.executable, "-c",
                                "from kv_transfer.cuda_ipc import host_key; print(host_key())"],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert other != here and other.split(":")[0] == here.split(":")[0]
