"""A node's throughput while it works: what it gets through per second of busy time (prompt tokens
prefilled, image tokens encoded), an exponentially weighted average over its recent busy spells.
Nodes report it (`NodeStatus.rates`); routers divide queued work by it to foresee a request's wait."""

from __future__ import annotations

import math


class Throughput:
    def __init__(self, time_constant_s: float = 5.0) -> None:
        self.time_constant_s = time_constant_s
        self.rate = 0.0          # units per busy second (0: nothing measured yet)

    def add(self, amount: float, seconds: float) -> None:
        """`amount` units of work done in `seconds` of busy time."""
        if amount <= 0 or seconds <= 0:
            return
        sample = amount / seconds
        weight = 1.0 if not self.rate else 1.0 - math.exp(-seconds / self.time_constant_s)
        self.rate += weight * (sample - self.rate)
