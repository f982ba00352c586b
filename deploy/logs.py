"""A child process's output into a size-capped log file (rotated), with chosen lines echoed.

`LogPump(path, max_bytes, backups, echo)` reads the child's stdout+stderr from a pipe on a thread
of its own and appends it to `path`; once `path` would pass `max_bytes` it becomes `path.1`
(`path.1` -> `path.2`, ... the oldest beyond `backups` is deleted), as logging's
RotatingFileHandler does, so that a node serving for weeks keeps at most
(backups + 1) x max_bytes on disk. Reading the pipe this way also catches what C libraries (UCX,
NCCL) write, which a handler inside the process would not. Lines for which `echo(line)` is true
are also written to the launcher's console (`epd serve` shows the router's periodic stats there).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import IO

DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_BACKUPS = 3


class LogPump:
    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 echo: Callable[[bytes], bool] | None = None) -> None:
        self.path, self.max_bytes, self.backups, self.echo = path, max_bytes, backups, echo
        self._file = open(path, "ab")  # noqa: SIM115 - open for as long as the child writes
        self._thread: threading.Thread | None = None

    def start(self, pipe: IO[bytes]) -> LogPump:
        self._thread = threading.Thread(target=self._pump, args=(pipe,), name=f"log:{os.path.basename(self.path)}",
                                        daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float = 5.0) -> None:
        """Wait until the child's output is all written (its pipe closed)."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _pump(self, pipe: IO[bytes]) -> None:
        try:
            for line in iter(pipe.readline, b""):
                self.write(line)
                if self.echo is not None and self.echo(line):
                    sys.stdout.write(line.decode(errors="replace"))
                    sys.stdout.flush()
        finally:
            pipe.close()
            self._file.close()

    def write(self, data: bytes) -> None:
        if self.max_bytes > 0 and self._file.tell() + len(data) > self.max_bytes and self._file.tell() > 0:
            self._rotate()
        self._file.write(data)
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.backups - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        if self.backups > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.remove(self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115
