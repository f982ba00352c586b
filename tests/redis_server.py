"""A real, private `redis-server` for tests: free port, temp dir, no persistence.

Lifecycle: `RedisServer()` picks a free loopback port and a temp dir; `start()` launches
`redis-server` from PATH and waits until it answers PING; `stop()` terminates it (SIGKILL
after a grace period) and removes the dir. Use it as a context manager, or from conftest::

    @pytest.fixture(scope="session")
    def redis_url():
        with RedisServer() as server:
            yield server.url

Raises `RedisServerUnavailable` when no `redis-server` binary is on PATH, so a fixture
can turn that into `pytest.skip`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class RedisServerUnavailable(RuntimeError):
    """No usable `redis-server` binary."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """One `redis-server` process bound to 127.0.0.1 on a free port."""

    def __init__(self, binary: str | None = None, start_timeout_s: float = 10.0) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RedisServerUnavailable("redis-server not found on PATH")
        self.binary = found
        self.host = "127.0.0.1"
        self.port = 0
        self.start_timeout_s = start_timeout_s
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, decode_responses=True)

    def start(self, attempts: int = 3) -> RedisServer:
        """Launch and wait for PING; retries on a new port if the free one was taken meanwhile."""
        self._dir = Path(tempfile.mkdtemp(prefix="epd-redis-"))
        for attempt in range(attempts):
            self.port = free_port(self.host)
            args = [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--dir",
                str(self._dir),
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            with open(self._dir / "redis.log", "wb") as log:
                self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            try:
                self._wait_ready()
                return self
            except RedisServerUnavailable:
                if attempt == attempts - 1:
                    self.stop()
                    raise
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._dir is not None
        deadline = time.monotonic() + self.start_timeout_s
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    log = (self._dir / "redis.log").read_text(errors="replace")
                    raise RedisServerUnavailable(f"redis-server exited with {self._proc.returncode}: {log}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self._proc.kill()
        self._proc.wait()
        raise RedisServerUnavailable(f"redis-server did not answer within {self.start_timeout_s}s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
