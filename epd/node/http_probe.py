"""A node's own HTTP endpoints, for orchestrators and scrapers: GET /health and GET /metrics.

`--http-port P` starts them on a thread of their own (the node's loop never waits on a client):
- GET /health: 200 `{"status": "ready"}` once the node is registered and warmed up; 503 with
  `"starting"` before that and `"draining"` after SIGTERM (so a pod leaves its Service at once);
- GET /metrics: the node's Prometheus families, by role, from a snapshot its loop refreshes every
  second (queues, running, KV pages in use / total, work done, refused messages), plus the
  process families of prometheus_client.
The loop publishes with `publish(state, status, counters)`; handlers only read that snapshot.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from epd.prometheus_text import CONTENT_TYPE, Labels, header, process_families, sample

log = logging.getLogger(__name__)


def node_metrics(role: str, node_id: str, status: dict[str, Any], counters: dict[str, float],
                 rejected: int) -> str:
    """The node's families in Prometheus' text format, labelled by role and node (names apart from the
    router's per-pool `epd:node_*` families, which sum the nodes)."""
    node: Labels = (("role", role), ("node", node_id))
    out = header("epd:requests_in_queue", "gauge", "Requests in each of the node's queues.")
    out += [sample("epd:requests_in_queue", (*node, ("queue", q)), n) for q, n in status.get("queues", {}).items()]
    if status.get("pages_total"):
        total, free = status["pages_total"], status["pages_free"]
        for name, kind, help_text, value in (
                ("epd:kv_pages_total", "gauge", "KV pages in the node's pool.", total),
                ("epd:kv_pages_in_use", "gauge", "KV pages held by requests or the prefix cache.", total - free),
                ("epd:kv_integrity_ok", "gauge", "1 while free + in-use pages add up to the pool.",
                 1.0 if status.get("integrity_ok", True) else 0.0),
                ("epd:preemptions_total", "counter", "Requests preempted for pages.", status.get("preemptions", 0))):
            out += [*header(name, kind, help_text), sample(name, node, value)]
    out += header("epd:work_done_total", "counter", "Work done (prompt tokens, generation tokens, images).")
    out += [sample("epd:work_done_total", (*node, ("kind", k)), v) for k, v in counters.items()]
    out += header("epd:refused_messages_total", "counter", "Control messages refused (not sealed, or malformed).")
    out.append(sample("epd:refused_messages_total", node, rejected))
    return "\n".join(out) + "\n"


class NodeHTTP:
    def __init__(self, host: str, port: int, role: str, node_id: str) -> None:
        self.role, self.node_id = role, node_id
        self.state = "starting"
        self.metrics_text = ""
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="node-http", daemon=True).start()

    def publish(self, state: str, status: dict[str, Any], counters: dict[str, float], rejected: int) -> None:
        """From the node's loop: what /health and /metrics say until the next call."""
        self.metrics_text = node_metrics(self.role, self.node_id, status, counters, rejected)
        self.state = state

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        probe = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                if self.path.split("?")[0] == "/health":
                    body = json.dumps({"status": probe.state, "role": probe.role, "node": probe.node_id}).encode()
                    self._reply(200 if probe.state == "ready" else 503, "application/json", body)
                elif self.path.split("?")[0] == "/metrics":
                    text = probe.metrics_text + process_families()
                    self._reply(200, CONTENT_TYPE, text.encode())
                else:
                    self._reply(404, "application/json", b'{"error": "not found"}')

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:   # probes every few seconds: not logged
                log.debug("http %s", fmt % args)

        return Handler
