"""Progress bar on stderr while a run is in flight.

Lifecycle: the runner opens one ``Progress`` per run, calls ``update(ok)`` as each request
finishes and ``close()`` at the end. tqdm draws the bar when it is installed; otherwise a
plain one-line bar is redrawn at most ten times a second. ``enabled=False`` draws nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.desc = desc
        self.enabled = enabled
        self._bar: Any = None
        self._last_draw = 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self._draw(force=True)
            else:
                self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self.failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
        else:
            self._draw(force=self.done == self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._draw(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = 30
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r{self.desc} [{bar}] {self.done}/{self.total} failed={self.failed}")
        sys.stderr.flush()
