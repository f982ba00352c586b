"""The periodic line a server logs while it works, as vLLM's engine does every 10 s.

`PeriodicStats.line(counters, gauges)` is called as often as the caller likes (a node's loop, the
router's timer); every `interval_s` it returns one line: each counter's rate over the interval
(tokens/s, images/s), then each gauge (running, waiting, KV usage). While nothing moves and every
gauge is zero it stays quiet after one idle line, so an idle server does not fill its log.
`--log-stats-interval S` (default 10) sets the interval; vLLM's `--disable-log-stats` turns it off.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 10.0


def add_log_stats_args(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    ap.add_argument("--log-stats-interval", type=float, default=DEFAULT_INTERVAL_S,
                    help="seconds between the periodic stats lines in the log (throughput, running, waiting, "
                         "KV usage); 0 = none")
    ap.add_argument("--disable-log-stats", action="store_true", help="vLLM's: no periodic stats lines")


def log_stats_interval(args: argparse.Namespace) -> float:
    return 0.0 if args.disable_log_stats else max(0.0, args.log_stats_interval)


class PeriodicStats:
    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.clock = interval_s, clock
        self.last_at = clock()
        self.last_counts: dict[str, float] = {}
        self.was_idle = True   # a server that has done nothing yet says nothing

    def due(self) -> bool:
        return self.interval_s > 0 and self.clock() - self.last_at >= self.interval_s

    def line(self, counters: dict[str, float], gauges: dict[str, float | str]) -> str | None:
        """`counters`: cumulative totals ("prompt tokens": 12345); `gauges`: values now ("running":
        3, "KV usage": "12.5%"). The line when one is due and something is to be said, else None."""
        now = self.clock()
        elapsed = now - self.last_at
        if not self.due():
            return None
        rates = {name: (value - self.last_counts.get(name, 0.0)) / elapsed for name, value in counters.items()}
        self.last_at, self.last_counts = now, dict(counters)
        idle = not any(rates.values()) and not any(v for v in gauges.values() if not isinstance(v, str))
        if idle and self.was_idle:
            return None
        self.was_idle = idle
        parts = [f"{name} {rate:.1f}/s" for name, rate in rates.items()]
        parts += [f"{name} {value}" for name, value in gauges.items()]
        return ", ".join(parts)


def percent(used: float, total: float) -> str:
    return f"{100.0 * used / total:.1f}%" if total else "n/a"
