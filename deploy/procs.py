"""Node processes for one machine: start, wait until registered in Redis, stop, kill.

`Cluster` starts `epd encoder|prefill|decode|colocated` processes (each in its own process group, each set
to die if the launcher dies), waits until every one has registered in Redis, and stops them
with SIGTERM (then SIGKILL after a grace period). Used by `epd serve` and the e2e tests.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import redis

from deploy.logs import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, LogPump
from kv_transfer.auth import ClusterSecret
from kv_transfer.registry import NodeRegistry


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when its parent dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class NodeProc:
    role: str
    node_id: str
    proc: subprocess.Popen
    log_path: str
    extra: list[str] = field(default_factory=list)   # its own arguments (a restart gives it the same)
    model: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    model: str
    redis_url: str
    log_dir: str
    device: str | None = None
    common_args: list[str] = field(default_factory=list)
    nodes: list[NodeProc] = field(default_factory=list)
    secret_file: str = ""        # the cluster secret (made in log_dir when not given)
    log_max_bytes: int = DEFAULT_MAX_BYTES   # each node's log is rotated at this size
    log_backups: int = DEFAULT_BACKUPS       # rotated files kept per node
    extra_env: dict[str, str] = field(default_factory=dict)   # e.g. CUDA MPS's pipe directory

    def __post_init__(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        if not self.secret_file:
            self.secret_file = os.path.join(self.log_dir, "cluster.secret")
            ClusterSecret.generate(self.secret_file)

    def add(self, role: str, extra: list[str] | None = None, node_id: str | None = None,
            model: str | None = None) -> NodeProc:
        index = sum(1 for n in self.nodes if n.role == role)
        node = self._spawn(role, node_id or f"{role}-{index}-{os.getpid()}", list(extra or []), model)
        self.nodes.append(node)
        return node

    def restart(self, node: NodeProc) -> NodeProc:
        """Start `node` again (a process that exited): same id, same arguments, the same log."""
        if node.alive():
            raise RuntimeError(f"{node.node_id} is still running")
        fresh = self._spawn(node.role, node.node_id, node.extra, node.model)
        self.nodes[self.nodes.index(node)] = fresh
        return fresh

    def _spawn(self, role: str, node_id: str, extra: list[str], model: str | None) -> NodeProc:
        args = [sys.executable, "-m", "epd.cli", role, "--model", model or self.model, "--node-id", node_id,
                "--cluster-secret-file", self.secret_file, *self.common_args]
        if self.device:
            args += ["--device", self.device]
        args += extra   # last: a node's own --device cuda:N (epd serve's GPU placement) wins
        log_path = os.path.join(self.log_dir, f"{node_id}.log")
        pump = LogPump(log_path, self.log_max_bytes, self.log_backups)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                start_new_session=True, env=self.env())
        pump.start(proc.stdout)
        return NodeProc(role, node_id, proc, log_path, extra, model)

    def env(self) -> dict[str, str]:
        """The environment of the processes it starts: the Redis URL (it may hold a password) there."""
        return dict(os.environ, EPD_REDIS_URL=self.redis_url, **self.extra_env)

    def wait_ready(self, nodes: list[NodeProc] | None = None, timeout_s: float = 180.0) -> None:
        registry = NodeRegistry(redis.Redis.from_url(self.redis_url))
        pending = list(nodes or self.nodes)
        deadline = time.monotonic() + timeout_s
        while pending:
            for node in list(pending):
                if not node.alive():
                    raise RuntimeError(f"{node.node_id} exited with {node.proc.returncode}:\n{node.log_tail()}")
                if registry.get(node.role, node.node_id) is not None:
                    pending.remove(node)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"nodes not ready after {timeout_s}s: {[n.node_id for n in pending]}")
            time.sleep(0.1)

    def kill(self, node: NodeProc, sig: int = signal.SIGKILL) -> None:
        if node.alive():
            os.killpg(node.proc.pid, sig)
            node.proc.wait(10)

    def stop(self, grace_s: float = 10.0) -> None:
        for node in self.nodes:
            if node.alive():
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in self.nodes:
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(5)
