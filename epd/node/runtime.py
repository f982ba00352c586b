"""What every node process shares: CLI args, control socket, data transport, Redis registration.

Lifecycle of a node process (`run_node`):
  1. parse args (`NodeArgs.from_cli`), build the role's service (loads the model);
  2. `NodeRuntime` binds a ZMQ ROUTER socket, starts the UCX `KVTransport`, publishes the KV
     layout and registers `epd:node:{role}:{id}` in Redis with a heartbeat;
     (with --http-port, /health and /metrics on a thread: `epd.node.http_probe`);
  3. loop (`epd.node.node_loop.run_node`): drain control messages -> `service.handle`, then
     `service.tick()` (poll transfers, run one model step); when a tick did no work the loop sleeps
     in poll() until a control message arrives, the transport signals a landed message or
     finished send, or 5 ms pass; the heartbeat carries `service.load()`;
  4. on SIGTERM / SIGINT: drain (published as draining, finish held work within --drain-timeout),
     `service.shutdown()`, close sockets.
A role's service implements: handle(identity, msg), tick() -> bool (did work), load() -> float,
held() -> int, counters(), status(), shutdown().
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from epd import protocol
from epd.engine.engine_args import add_engine_args, engine_kwargs
from epd.engine.rank_handover import open_rank_transports
from epd.node.gpu_sharing import warn_if_shared_without_mps
from epd.node.http_probe import NodeHTTP
from epd.periodic_stats import DEFAULT_INTERVAL_S, add_log_stats_args, log_stats_interval
from kv_transfer.auth import AuthError, ClusterSecret
from kv_transfer.layout import KVLayout
from kv_transfer.redis_util import connect
from kv_transfer.registry import NodeInfo, NodeRegistry
from kv_transfer.transport import KVTransport

log = logging.getLogger(__name__)
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
    advertise_host: str = ""             # what the registry publishes ("" = host)
    http_port: int | None = None         # /health and /metrics (None: not served)
    drain_timeout_s: float = 30.0
    max_batch_image_tokens: int = 16384  # encoder: image tokens per vision forward
    embedding_arena_tokens: int = 32768  # prefill: rows encoders may write embeddings into (CUDA IPC)
    secret_file: str = ""                # where `secret` came from ("": the environment), for TP ranks

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
                   log_stats_interval(a), advertised_host(a.host, a.advertise_host), a.http_port, a.drain_timeout,
                   getattr(a, "max_batch_image_tokens", 16384), getattr(a, "embedding_arena_tokens", 32768),
                   a.cluster_secret_file or "")


def advertised_host(bind: str, given: str | None) -> str:
    """What peers are told: --advertise-host, else the bind address, else (bound to every
    interface) this host's name resolved (a pod's IP)."""
    if given:
        return given
    if bind in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return bind


def node_parser(role: str) -> argparse.ArgumentParser:
    """A node's command line (`epd serve` checks its nodes' arguments with it before starting any)."""
    ap = argparse.ArgumentParser(prog=f"epd {role}", description=f"run an EPD {role} node")
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--redis-url", default=os.environ.get("EPD_REDIS_URL"),
                    help="redis[s]://[user:password@]host:port/db (default: $EPD_REDIS_URL, which keeps a "
                         "password off the command line)")
    ap.add_argument("--host", default="127.0.0.1", help="address the control socket, /health and UCX's "
                    "transports bind (0.0.0.0: every interface, as in a pod); the UCX listener's own port listens "
                    "on every interface whatever this says (ucxx binds no address) and reads only peers holding "
                    "the cluster secret (default: 127.0.0.1)")
    ap.add_argument("--advertise-host", default=None, help="address the registry publishes for peers to reach "
                    "this node (default: --host; with --host 0.0.0.0, this host's name resolved, as a pod's IP)")
    ap.add_argument("--port", type=int, default=0, help="control (ZMQ) port; 0 = any free port")
    ap.add_argument("--http-port", type=int, default=None, help="serve GET /health (200 once registered and "
                    "warmed up, 503 while starting or draining) and GET /metrics on --host at this port; 0 = any "
                    "free port (published in the registry) (default: none)")
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM: tell the routers at once "
                    "(they send nothing new), finish what the node holds within this many seconds, then exit 0 "
                    "(default: %(default)s)")
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
    if role == "encoder":
        ap.add_argument("--max-batch-image-tokens", type=int, default=16384,
                        help="image tokens one vision forward takes at most (requests are batched by their "
                             "images' tokens; a request over it runs alone) (default: 16384)")
    if role == "prefill":
        ap.add_argument("--embedding-arena-tokens", type=int, default=32768,
                        help="on a GPU: image-token rows an encoder on this host writes embeddings into through "
                             "CUDA IPC (32768 x hidden size x dtype bytes of GPU memory; 0: embeddings always "
                             "come over UCX; --no-kv-ipc turns this off too) (default: 32768)")
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
    def held(self) -> int: ...                     # requests it still owes work (a drain ends at 0)
    def shutdown(self) -> None: ...


def kv_layout_of(core: Any) -> KVLayout:
    """The KV layout an EngineCore's pool has (what prefill and decode must agree on)."""
    tc = core.model_config.text
    return KVLayout(model_id=core.model_config.model_id, dtype=str(core.dtype).replace("torch.", ""),
                    num_layers=tc.num_layers, num_kv_heads=tc.num_kv_heads, head_dim=tc.head_dim,
                    cross_layers=tuple(core.model.cross_layers),
                    chunked_layers=tuple(i for i, c in enumerate(core.model.attention_chunks) if c),
                    attention_chunk_size=max((c for c in core.model.attention_chunks if c), default=0))


def pool_status(pool: Any, check: Any, queues: dict[str, int]) -> dict[str, Any]:
    """NodeStatus fields for a node with a KV pool (a role engine: `capacity` and `num_free` pages,
    `num_preemptions`); `check` is its integrity check."""
    try:
        check()
        ok, error = True, ""
    except AssertionError as e:
        ok, error = False, str(e)
    return dict(pages_total=pool.capacity, pages_free=pool.num_free, integrity_ok=ok, integrity_error=error,
                queues=queues, preemptions=pool.num_preemptions, page_size=pool.page_size,
                tensor_parallel_size=pool.tensor_parallel_size)


def token_delta(ev: Any, prompt_tokens: int, cached_tokens: int, timings: dict[str, float]) -> protocol.TokenDelta:
    """The router's message for one of the engine's `TokenEvent`s."""
    return protocol.TokenDelta(
        ev.rid, [ev.token_id], ev.text, logprobs=[ev.logprob] if ev.logprob is not None else None,
        top_logprobs=[[list(x) for x in ev.top_logprobs]] if ev.top_logprobs else None,
        finished=ev.finished, finish_reason=ev.finish_reason, prompt_tokens=prompt_tokens,
        completion_tokens=ev.completion_tokens, cached_tokens=cached_tokens, timings=timings)


class NodeRuntime:
    def __init__(self, args: NodeArgs, device: str, layout: KVLayout | None, capacity: int,
                 kv_ipc: str = "", max_context: int = 0, tp_leader: Any = None) -> None:
        """`tp_leader`: a node of several processes (tensor parallel): each rank opens a KV transport
        too, published for rank-by-rank hand-overs."""
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
        host = args.advertise_host or args.host
        self.zmq_address = f"{host}:{port}"
        self.transport = KVTransport(host, 0, device=device, progress_mode=args.ucx_progress, secret=args.secret,
                                     bind=args.host)
        ranks = open_rank_transports(tp_leader, host, args.host, args.secret_file, args.ucx_progress) \
            if tp_leader is not None else []
        self.http = NodeHTTP(args.host, args.http_port, args.role, args.node_id) if args.http_port is not None else None
        self.http_address = f"{host}:{self.http.port}" if self.http is not None else ""
        self.poller = zmq.Poller()   # control messages, or a KV/embedding message landing
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.transport.wakeup_fd, zmq.POLLIN)
        layout_hash, keep = "", {}
        if layout is not None:   # kept written by the heartbeat: a restarted Redis has it again
            layout_hash = layout.layout_hash()
            keep[LAYOUT_KEY.format(layout_hash)] = json.dumps(layout.to_dict())
        info = NodeInfo(role=args.role, node_id=args.node_id, zmq=self.zmq_address, ucx=self.transport.address,
                        http=self.http_address,
                        model=os.path.basename(os.path.normpath(args.model)), layout_hash=layout_hash,
                        capacity=capacity, started_at=time.time(), kv_ipc=kv_ipc if args.kv_ipc else "",
                        max_context=max_context, ucx_ranks=",".join(ranks))
        self.secret = args.secret
        self.lease = NodeRegistry(self.redis, self.secret).register(info, ttl_s=args.heartbeat_ttl, also_write=keep)
        self.rejected = 0   # control messages refused (not the cluster's, or malformed)
        self.node_id = args.node_id
        warn_if_shared_without_mps(device, args.role)

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
        steps = [self.lease.deregister, self.transport.close, self.sock.close, self.ctx.term]
        for step in steps + ([self.http.close] if self.http is not None else []):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - shutdown goes on regardless
                log.debug("shutdown step failed: %s", e)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
