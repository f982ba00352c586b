"""Which GPU each node `epd serve` starts runs on, and its share of that GPU's memory.

Given the GPUs to use (`--gpus`, default every visible one), prefill, decode and colocated nodes
each take the next free GPUs (a node of tensor-parallel size K takes K in a row): prefill nodes
first, then decode, then colocated. Encoders take a free GPU when one is left, else share the GPU
of a prefill node (the vision tower's output goes there), the one with the fewest nodes. When the
nodes outnumber the GPUs, the rest are dealt out again over the GPUs from the first, sharing. So
on 2 GPUs 1E 1P 1D puts the encoder with the prefill node on GPU 0 and decode on GPU 1; on 4 GPUs
1E 1P 2D and 1E 2P 1D give every node a GPU of its own; 2 colocated nodes on 2 GPUs one each.

Each node runs with `--device cuda:N` and sees every GPU, so the CUDA IPC hand-overs (KV into
decode's pages, embeddings into prefill's arena) work between GPUs of the host too. The nodes
sharing a GPU split its memory as `gpu_shares` says for that GPU's nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy.gpu_shares import gpu_shares

ROLES = ("encoder", "prefill", "decode", "colocated")


@dataclass(frozen=True)
class Placement:
    role: str
    gpu: int                   # the node's first GPU (its device, cuda:gpu)
    gpus: tuple[int, ...]      # every GPU it runs on (tensor parallel: several)
    share: float | None        # of each of its GPUs' memory (None: an encoder, which takes what it needs)


def place(gpus: list[int], counts: dict[str, int], tensor_parallel: int = 1) -> list[Placement]:
    """A placement per node: `counts` of each role in ROLES, on `gpus` (indices as visible)."""
    if not gpus:
        raise ValueError("no GPU to place the nodes on")
    if tensor_parallel > len(gpus):
        raise ValueError(f"tensor parallel size {tensor_parallel} needs {tensor_parallel} GPUs; {len(gpus)} given")
    slots = len(gpus) // tensor_parallel            # groups of K GPUs in a row
    groups = [tuple(gpus[i * tensor_parallel:(i + 1) * tensor_parallel]) for i in range(slots)]
    taken: list[list[str]] = [[] for _ in groups]   # the roles on each group
    where: list[tuple[str, int]] = []
    turn = 0
    for role in ("prefill", "decode", "colocated"):
        for _ in range(counts.get(role, 0)):
            where.append((role, turn % slots))
            taken[turn % slots].append(role)
            turn += 1
    for _ in range(counts.get("encoder", 0)):
        group = _encoder_group(taken)
        where.append(("encoder", group))
        taken[group].append("encoder")
    shares = [_shares_of(roles) for roles in taken]
    return [Placement(role, groups[g][0], groups[g][:1] if role == "encoder" else groups[g], shares[g].get(role))
            for role, g in where]


def _encoder_group(taken: list[list[str]]) -> int:
    """A free GPU group, else the prefill group (else any) with the fewest nodes."""
    free = [g for g, roles in enumerate(taken) if not roles]
    if free:
        return free[0]
    with_prefill = [g for g, roles in enumerate(taken) if "prefill" in roles]
    pool = with_prefill or list(range(len(taken)))
    return min(pool, key=lambda g: (len(taken[g]), g))


def _shares_of(roles: list[str]) -> dict[str, float]:
    """Each role's share of one GPU holding `roles` (an encoder alone on a GPU gets none: it takes what
    it needs; a GPU holding only encoders has nothing to size)."""
    count = {role: roles.count(role) for role in ROLES}
    if not (count["prefill"] or count["decode"] or count["colocated"]):
        return {}
    return gpu_shares(count["encoder"], count["prefill"], count["decode"], count["colocated"])


def shared_gpus(placements: list[Placement]) -> list[int]:
    """GPUs that more than one node runs on (CUDA MPS helps those)."""
    users: dict[int, int] = {}
    for p in placements:
        for gpu in p.gpus:
            users[gpu] = users.get(gpu, 0) + 1
    return sorted(gpu for gpu, n in users.items() if n > 1)


def describe(placements: list[Placement]) -> str:
    parts = []
    for gpu in sorted({g for p in placements for g in p.gpus}):
        here = [p for p in placements if gpu in p.gpus]
        names = ", ".join(p.role + (f" {p.share:.3f}" if p.share is not None else "") for p in here)
        parts.append(f"GPU {gpu}: {names}")
    return "nodes on GPUs (memory share of the GPU): " + "; ".join(parts)
