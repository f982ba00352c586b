"""What every node process shares: CLI args, control socket, data transport, Redis registration.

Lifecycle of a node process (`run_node`):
  1. parse args (`NodeArgs.from_cli`), build the role's service (loads the model);
  2. `NodeRuntime` binds a ZMQ ROUTER socket, starts the UCX `KVTransport`, publishes the KV
     layout and registers `epd:node:{role}:{id}` in Redis with a heartbeat;
  3. loop: drain control messages -> `service.handle`, then `service.tick()` (poll transfers,
     run one model step); when a tick did no work the loop sleeps in poll() until a control
     message arrives, the transport signals a landed message or finished send, or 5 ms pass;
     the heartbeat carries `service.load()`;
  4. on SIGTERM / SIGINT: deregister, `service.shutdown()`, close sockets.
A role's service implements: handle(identity, msg), tick() -> bool (did work), load() -> float,
shutdown().
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from epd import protocol
from epd.engine.engine_args import add_engine_args, engine_kwargs
from epd.periodic_stats import DEFAULT_INTERVAL_S, PeriodicStats, add_log_stats_args, log_stats_interval, percent
from kv_transfer.auth import AuthError, ClusterSecret
from kv_transfer.layout import KVLayout
from kv_transfer.redis_util import connect
from kv_transfer.registry import NodeInfo, NodeRegistry
from kv_transfer.transport import SWITCH_INTERVAL_S, KVTransport

log = logging.getLogger(__name__)
stats_log = logging.getLogger("epd.stats")
LAYOUT_KEY = "epd:layout:{}"


@dataclass(frozen=True)
class NodeArgs:
    role: str
    model: str
    redis_url: str
    host: str
    port: int
    node_id: str
    heartbeat_ttl: float
    layer_group_size: int
    kv_timeout: float
    engine: dict[str, Any]               # EngineConfig fields (epd.engine.engine_args)
    secret: ClusterSecret = dataclasses.field(repr=False)
    log_level: str = "INFO"
    kv_ipc: bool = True
    ucx_progress: str = "thread"
    stats_interval_s: float = DEFAULT_INTERVAL_S

    @classmethod
    def from_cli(cls, role: str, argv: list[str] | None) -> NodeArgs:
        ap = node_parser(role)
        a = ap.parse_args(argv)
        if not a.redis_url:
            ap.error("--redis-url (or $EPD_REDIS_URL) is required")
        try:
            secret = ClusterSecret.load(a.cluster_secret_file)
        except (OSError, ValueError) as e:
            ap.error(str(e))
        node_id = a.node_id or f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        engine = engine_kwargs(a)
        if role == "decode":   # a decode node computes no prompt: nothing to cache
            engine["disable_prefix_caching"] = True
        return cls(role, a.model, a.redis_url, a.host, a.port, node_id, a.heartbeat_ttl, a.layer_group_size,
                   a.kv_timeout, engine, secret, a.log_level, not a.no_kv_ipc, a.ucx_progress,
                   log_stats_interval(a))


def node_parser(role: str) -> argparse.ArgumentParser:
    """A node's command line (`epd serve` checks its nodes' arguments with it before starting any)."""
    ap = argparse.ArgumentParser(prog=f"epd {role}", description=f"run an EPD {role} node")
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--redis-url", default=os.environ.get("EPD_REDIS_URL"),
                    help="redis[s]://[user:password@]host:port/db (default: $EPD_REDIS_URL, which keeps a "
                         "password off the command line)")
    ap.add_argument("--host", default="127.0.0.1", help="address peers use to reach this node")
    ap.add_argument("--port", type=int, default=0, help="control (ZMQ) port; 0 = any free port")
    ap.add_argument("--node-id", default=None, help="this node's name in Redis (default: ROLE-HOST-PID-RANDOM)")
    ap.add_argument("--heartbeat-ttl", type=float, default=6.0, help="seconds until a silent node drops out")
    ap.add_argument("--layer-group-size", type=int, default=0,
                    help="layers per KV transfer message, streamed as prefill goes; 0 = all in one message "
                         "after the last layer (fastest TTFT measured on one H100, see BENCHMARKS.md)")
    ap.add_argument("--kv-timeout", type=float, default=60.0, help="seconds a request may wait for its KV")
    ap.add_argument("--no-kv-ipc", action="store_true",
                    help="always send KV over UCX, even to a GPU node on this host (default: copy pages "
                         "through CUDA IPC when both nodes are on one host with one page size)")
    ap.add_argument("--ucx-progress", default="thread", choices=["thread", "thread-polling"],
                    help="UCX progress thread; thread-polling spins a core (lower latency on an idle CPU "
                         "host, slower TTFT measured on the H100 host, see BENCHMARKS.md)")
    add_engine_args(ap.add_argument_group("engine"))
    ap.add_argument("--cluster-secret-file", default=None,
                    help="the cluster secret every node and router holds (default: $EPD_CLUSTER_SECRET_FILE, "
                         "else $EPD_CLUSTER_SECRET; epd serve makes one)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_log_stats_args(ap)
    return ap


class Service(Protocol):
    def handle(self, identity: bytes, msg: Any) -> None: ...
    def tick(self) -> bool: ...
    def load(self) -> float: ...
    def status(self) -> dict[str, Any]: ...   # NodeStatus fields other than node/role/nonce
    def counters(self) -> dict[str, float]: ...   # cumulative work done ("prompt tokens": n), for the log
    def shutdown(self) -> None: ...


def kv_layout_of(core: Any) -> KVLayout:
    """The KV layout an EngineCore's pool has (what prefill and decode must agree on)."""
    tc = core.model_config.text
    return KVLayout(model_id=core.model_config.model_id, dtype=str(core.dtype).replace("torch.", ""),
                    num_layers=tc.num_layers, num_kv_heads=tc.num_kv_heads, head_dim=tc.head_dim)


def pool_status(pool: Any, check: Any, queues: dict[str, int]) -> dict[str, Any]:
    """NodeStatus fields for a node with a KV pool (a role engine: `capacity` and `num_free` pages,
    `num_preemptions`); `check` is its integrity check."""
    try:
        check()
        ok, error = True, ""
    except AssertionError as e:
        ok, error = False, str(e)
    return dict(pages_total=pool.capacity, pages_free=pool.num_free, integrity_ok=ok, integrity_error=error,
                queues=queues, preemptions=pool.num_preemptions)


class NodeRuntime:
    def __init__(self, args: NodeArgs, device: str, layout: KVLayout | None, capacity: int,
                 kv_ipc: str = "", max_context: int = 0) -> None:
        self.args = args
        self.redis = connect(args.redis_url)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if args.port:
            self.sock.bind(f"tcp://{args.host}:{args.port}")
            port = args.port
        else:
            port = self.sock.bind_to_random_port(f"tcp://{args.host}")
        self.zmq_address = f"{args.host}:{port}"
        self.transport = KVTransport(args.host, 0, device=device, progress_mode=args.ucx_progress, secret=args.secret)
        self.poller = zmq.Poller()   # control messages, or a KV/embedding message landing
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.transport.wakeup_fd, zmq.POLLIN)
        layout_hash, keep = "", {}
        if layout is not None:   # kept written by the heartbeat: a restarted Redis has it again
            layout_hash = layout.layout_hash()
            keep[LAYOUT_KEY.format(layout_hash)] = json.dumps(layout.to_dict())
        info = NodeInfo(role=args.role, node_id=args.node_id, zmq=self.zmq_address, ucx=self.transport.address,
                        model=os.path.basename(os.path.normpath(args.model)), layout_hash=layout_hash,
                        capacity=capacity, started_at=time.time(), kv_ipc=kv_ipc if args.kv_ipc else "",
                        max_context=max_context)
        self.secret = args.secret
        self.lease = NodeRegistry(self.redis, self.secret).register(info, ttl_s=args.heartbeat_ttl, also_write=keep)
        self.rejected = 0   # control messages refused (not the cluster's, or malformed)
        self.node_id = args.node_id

    def recv(self, timeout_ms: int) -> list[tuple[bytes, Any]]:
        """Drain the control socket; waits up to timeout_ms for the first message."""
        out = []
        if timeout_ms:
            ready = dict(self.poller.poll(timeout_ms))
            if self.transport.wakeup_fd in ready:
                self.transport.drain_wakeups()
            if self.sock not in ready:
                return out
        while True:
            try:   # without copying the frame out of ZMQ's buffer (an image's pixels: megabytes)
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            try:
                if len(frames) != 3:
                    raise AuthError(f"{len(frames) - 1} frames where a sealed message has 2")
                payload = self.secret.unseal(frames[1].buffer, frames[2].buffer)
                out.append((frames[0].bytes, protocol.decode(payload)))
            except (AuthError, protocol.ProtocolError) as e:
                self.rejected += 1
                if self.rejected <= 10 or self.rejected % 1000 == 0:   # a flood is not a log flood
                    log.warning("refused control message %d: %s", self.rejected, e)

    def send(self, identity: bytes, msg: Any) -> None:
        try:
            self.sock.send_multipart([identity, *self.secret.seal(protocol.encode(msg))], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the router went away; nothing to deliver to
            log.warning("could not send %s to the router: %s", type(msg).__name__, e)

    def close(self) -> None:
        for step in (self.lease.deregister, self.transport.close, self.sock.close, self.ctx.term):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - shutdown goes on regardless
                log.debug("shutdown step failed: %s", e)


def run_node(runtime: NodeRuntime, service: Service) -> None:
    stop = {"flag": False}

    def _stop(signum: int, _frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    print(f"EPD {runtime.args.role} node {runtime.node_id} ready: zmq {runtime.zmq_address} "
          f"ucx {runtime.transport.address}", flush=True)
    busy = False
    last_load = 0.0
    stats = PeriodicStats(runtime.args.stats_interval_s)
    while not stop["flag"]:
        for identity, msg in runtime.recv(0 if busy else 5):
            if isinstance(msg, protocol.StatusRequest):
                runtime.send(identity, protocol.NodeStatus(runtime.node_id, runtime.args.role, msg.nonce,
                                                           **service.status(), rejected_messages=runtime.rejected))
            else:
                _handle(runtime, service, identity, msg)
        busy = service.tick()
        now = time.monotonic()
        if now - last_load > 0.5:
            runtime.lease.update_load(service.load())
            last_load = now
        if stats.due():
            _log_stats(stats, runtime, service)
    service.shutdown()
    runtime.close()


def _log_stats(stats: PeriodicStats, runtime: NodeRuntime, service: Service) -> None:
    status = service.status()
    gauges: dict[str, float | str] = dict(status.get("queues", {}))
    if status.get("pages_total"):
        gauges["KV usage"] = percent(status["pages_total"] - status["pages_free"], status["pages_total"])
    if runtime.rejected:
        gauges["refused messages"] = runtime.rejected
    line = stats.line(service.counters(), gauges)
    if line is not None:
        stats_log.info("%s node %s: %s", runtime.args.role, runtime.node_id, line)


STAGE_OF_ROLE = {"encoder": "encode", "prefill": "prefill", "decode": "decode"}


def _handle(runtime: NodeRuntime, service: Service, identity: bytes, msg: Any) -> None:
    """A control message to the service; one it fails on is refused (counted, reported to its
    sender under its request id) and the node goes on."""
    try:
        service.handle(identity, msg)
    except Exception as e:  # noqa: BLE001 - no message may take the node down
        runtime.rejected += 1
        log.exception("refused %s", type(msg).__name__)
        rid = getattr(msg, "rid", None)
        if rid:
            runtime.send(identity, protocol.StageReport(rid, STAGE_OF_ROLE.get(runtime.args.role, "?"),
                                                        runtime.node_id, ok=False, error=f"refused: {e}"))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
