"""A node process's main loop, its drain, and what it reports about itself while it runs.

`run_node(runtime, service)`: drain control messages -> `service.handle`, then `service.tick()`;
the heartbeat carries `service.load()`; every second the HTTP probe's snapshot (/health,
/metrics) is refreshed; every `--log-stats-interval` a stats line is logged.

Drain (the first SIGTERM or SIGINT): the node publishes at once that it is draining (routers stop
picking it within their 0.5 s refresh, and keep waiting on what it holds), /health says 503
"draining", and the node goes on serving what it holds and what was already on its way to it; it
exits 0, leaving the registry, once it holds nothing (and at least `MIN_DRAIN_S` passed, for
messages sent before the router saw the drain) or when `--drain-timeout` passes, whichever is
first. A second signal stops it at once.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any

from epd import protocol
from epd.node.runtime import NodeRuntime, Service
from epd.periodic_stats import PeriodicStats, percent
from kv_transfer.transport import SWITCH_INTERVAL_S

log = logging.getLogger("epd.node")
stats_log = logging.getLogger("epd.stats")
MIN_DRAIN_S = 2.0            # > the router's pool refresh (0.5 s) plus a message in flight
STAGE_OF_ROLE = {"encoder": "encode", "prefill": "prefill", "decode": "decode", "colocated": "generate"}


class _Signals:
    def __init__(self) -> None:
        self.count = 0
        self.first_at = 0.0
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.count += 1
        self.first_at = self.first_at or time.monotonic()


def run_node(runtime: NodeRuntime, service: Service) -> None:
    signals = _Signals()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    args = runtime.args
    http = f" http {runtime.http_address}" if runtime.http is not None else ""
    print(f"EPD {args.role} node {runtime.node_id} ready: zmq {runtime.zmq_address} "
          f"ucx {runtime.transport.address}{http}", flush=True)
    busy, last_load, last_probe = False, 0.0, 0.0
    stats = PeriodicStats(args.stats_interval_s)
    draining = False
    while signals.count < 2:
        for identity, msg in runtime.recv(0 if busy else 5):
            if isinstance(msg, protocol.StatusRequest):
                runtime.send(identity, protocol.NodeStatus(runtime.node_id, args.role, msg.nonce,
                                                           **service.status(), rejected_messages=runtime.rejected))
            else:
                _handle(runtime, service, identity, msg)
        busy = service.tick()
        now = time.monotonic()
        if signals.count and not draining:
            draining = True
            runtime.lease.set_draining()
            log.info("draining: routers send nothing new; finishing %d held requests (at most %.0f s)",
                     service.held(), args.drain_timeout_s)
        if not draining and now - last_load > 0.5:
            runtime.lease.update_load(service.load())
            last_load = now
        if draining and _drained(service, now - signals.first_at, args.drain_timeout_s):
            break
        state = "draining" if draining else "ready"
        if runtime.http is not None and (now - last_probe > 1.0 or runtime.http.state != state):
            runtime.http.publish(state, service.status(), service.counters(), runtime.rejected)
            last_probe = now
        if stats.due():
            _log_stats(stats, runtime, service)
    log.info("stopping (%d requests still held)", service.held())
    service.shutdown()
    runtime.close()


def _drained(service: Service, draining_s: float, timeout_s: float) -> bool:
    if draining_s >= timeout_s:
        log.warning("drain timeout (%.0f s) passed with %d requests held", timeout_s, service.held())
        return True
    return draining_s >= min(MIN_DRAIN_S, timeout_s) and service.held() == 0


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
