"""Which nodes may hand KV over through CUDA IPC: processes that share a machine and an IPC
namespace (one `epd serve`), not pods that only share a machine; and a prefill node only with a
decode node whose pool is on a GPU the prefill process sees (`ipc_pairable`, what the router asks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kv_transfer.cuda_ipc import (
    MAX_CAPABILITY_CHARS,
    MAX_VISIBLE_GPUS,
    IpcCapability,
    host_key,
    ipc_capability,
    ipc_pairable,
)


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


GPU0, GPU1 = "GPU-5c8f3a2e-0000-4000-8000-000000000000", "GPU-9d1b7c44-0000-4000-8000-000000000001"


def _cap(gpu: str = GPU0, visible: tuple[str, ...] = (GPU0, GPU1), host: str = "", page_size: int = 16) -> str:
    return IpcCapability(host or host_key(), page_size, gpu, visible).to_wire()


def test_a_node_off_a_gpu_publishes_no_capability_and_never_pairs():
    assert ipc_capability("cpu", 16) == ""
    assert not ipc_pairable("", _cap()) and not ipc_pairable(_cap(), "") and not ipc_pairable("", "")


def test_the_published_capability_reads_back_as_written():
    text = _cap(gpu=GPU1, visible=(GPU1,))
    assert IpcCapability.parse(text) == IpcCapability(host_key(), 16, GPU1, (GPU1,))
    mig = "MIG-GPU-5c8f3a2e-0000-4000-8000-000000000000/1/0"   # old-style MIG names carry slashes
    assert IpcCapability.parse(_cap(gpu=mig, visible=(mig,))).gpu == mig


def test_prefill_pairs_with_decode_only_when_it_sees_the_gpu_of_decode_s_pool():
    """Pods of one machine may share its IPC namespace (hostIPC) yet see different GPUs."""
    assert ipc_pairable(_cap(gpu=GPU0, visible=(GPU0,)), _cap(gpu=GPU0, visible=(GPU0,)))
    assert ipc_pairable(_cap(gpu=GPU0, visible=(GPU0, GPU1)), _cap(gpu=GPU1, visible=(GPU1,)))
    assert not ipc_pairable(_cap(gpu=GPU0, visible=(GPU0,)), _cap(gpu=GPU1, visible=(GPU1,)))
    # prefill writes into decode's pool, not the other way round
    assert not ipc_pairable(_cap(gpu=GPU1, visible=(GPU1,)), _cap(gpu=GPU0, visible=(GPU0, GPU1)))


def test_other_machines_namespaces_or_page_sizes_never_pair():
    here = _cap()
    assert not ipc_pairable(here, _cap(host="another-boot-id:ipc:[4026531839]"))
    assert not ipc_pairable(here, _cap(page_size=32))


@pytest.mark.parametrize("text", [
    f"{host_key()}/16",                                   # a node of the previous release
    _cap().replace("ipc2;", "ipc3;"),
    _cap().replace(";16;", ";0;"), _cap().replace(";16;", ";-16;"), _cap().replace(";16;", ";x;"),
    _cap(gpu=""), _cap(gpu="GPU 0"), _cap() + ";extra", _cap(visible=(GPU0, "")),
    _cap(visible=tuple(f"GPU-{i}" for i in range(MAX_VISIBLE_GPUS + 1))),
    _cap(host="a" * 300), "ipc2;" + "x" * MAX_CAPABILITY_CHARS,
])
def test_a_malformed_or_oversized_capability_is_read_as_none_and_never_pairs(text):
    assert IpcCapability.parse(text) is None
    assert not ipc_pairable(text, _cap()) and not ipc_pairable(_cap(), text)


def test_the_largest_capability_a_node_can_publish_is_within_the_bound():
    migs = tuple(f"MIG-{i:08d}-0000-4000-8000-000000000000" for i in range(MAX_VISIBLE_GPUS))
    text = _cap(gpu=migs[0], visible=migs, host="b" * 36 + ":ipc:[4026531839]")
    assert len(text) <= MAX_CAPABILITY_CHARS and ipc_pairable(text, text)


def test_a_pool_that_could_not_be_opened_is_forgotten_once_its_owner_is_gone():
    """A prefill node whose every write into a decode pool failed keeps only the note not to try it
    again; its sweep of departed decode nodes still drops that note (it used to skip the sweep while
    no pool was mapped, keeping the note for good)."""
    from kv_transfer.cuda_ipc import PoolImports

    pools = PoolImports("cpu")
    assert not pools
    assert pools.mark_unusable({"id": "pool-1", "owner": "decode-a"}, "cannot open")
    assert not pools.mark_unusable({"id": "pool-1", "owner": "decode-a"}, "cannot open"), "noted once"
    assert len(pools) == 1, "the sweep runs while a note is held"
    assert pools.drop_orphans({"decode-a"}) == []
    assert pools.drop_orphans({"decode-b"}) == ["pool-1"]
    assert not pools
