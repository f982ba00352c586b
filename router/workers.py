"""`epd router --api-server-count N`: N router processes behind one listening socket (vLLM's flag).

One router process tops out at one core: parsing, chat templates, tokenizing and SSE framing of
every request run on its event loop (on one H100, 16 single-image requests a second already kept
requests 56 ms before dispatch). With N workers the kernel hands each accepted connection to one
of them; each worker is a whole router over the same node pools (its own pool view, prefix index
and load estimates, refreshed from Redis and from the nodes' reports), so nothing crosses between
them on a request's path. /metrics from any worker sums all of them (`router.worker_metrics`).

Lifecycle: the parent binds and listens (port 0: the kernel picks), starts the workers on that
socket (`--worker-socket-fd`), forwards their output, prints `EPD router ready on ...` once every
worker is ready; SIGTERM / SIGINT go on to the workers, which drain as one router does. A worker
that exits on its own takes the others down with it (the supervisor above restarts the router).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

READY = "EPD router worker "


def strip_count(argv: list[str]) -> list[str]:
    """argv without --api-server-count (the workers run one router each)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--api-server-count", "-asc"):
            skip = True
        elif not arg.startswith("--api-server-count="):
            out.append(arg)
    return out


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _forward(proc: subprocess.Popen, ready: threading.Event) -> None:
    for line in proc.stdout:
        if line.startswith(READY):
            ready.set()
        sys.stdout.write(line)
        sys.stdout.flush()


def run_workers(count: int, host: str, port: int, argv: list[str]) -> int:
    try:
        sock = _listen(host, port)
    except OSError as e:
        print(f"epd router: cannot serve on {host}:{port}: {e.strerror}", file=sys.stderr)
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="epd-router-metrics-")
    base = [sys.executable, "-m", "router.main", *strip_count(argv), "--worker-socket-fd", str(sock.fileno()),
            "--worker-metrics-dir", metrics_dir]
    workers, readies = [], []
    stopping = threading.Event()

    def stop(signum, _frame) -> None:
        stopping.set()
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)   # each drains, as one router does

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for i in range(count):
            proc = subprocess.Popen([*base, "--worker-index", str(i)], pass_fds=(sock.fileno(),),
                                    stdout=subprocess.PIPE, text=True, bufsize=1)
            ready = threading.Event()
            threading.Thread(target=_forward, args=(proc, ready), daemon=True).start()
            workers.append(proc)
            readies.append(ready)
        code = _supervise(workers, readies, stopping, sock, host)
    finally:
        stop(signal.SIGTERM, None)
        for proc in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _supervise(workers: list[subprocess.Popen], readies: list[threading.Event], stopping: threading.Event,
               sock: socket.socket, host: str) -> int:
    """Print ready once every worker is; return when asked to stop (0) or when a worker exits (its code)."""
    announced = False
    while not stopping.is_set():
        for i, proc in enumerate(workers):
            if proc.poll() is not None:
                print(f"epd router: worker {i} exited with {proc.returncode}; stopping the others", file=sys.stderr)
                return proc.returncode or 1
        if not announced and all(r.is_set() for r in readies):
            shown = f"[{host}]" if ":" in host else host
            print(f"EPD router ready on http://{shown}:{sock.getsockname()[1]} ({len(workers)} workers)", flush=True)
            announced = True
        time.sleep(0.1)
    return 0
