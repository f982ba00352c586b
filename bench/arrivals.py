"""Arrival process: when each measured request leaves the client.

Lifecycle: ``arrival_offsets`` is computed once per run, before the first request, from the
rate, the burstiness and the seed, so a run is reproducible; the runner then sleeps until
``start + offset[i]`` before releasing request ``i`` (and, with ``--max-concurrency``, the
request may further wait for a free slot).

Inter-arrival gaps follow a gamma distribution with shape ``burstiness`` and scale
``1 / (rate * burstiness)``: the mean gap is always ``1 / rate``; ``burstiness = 1`` is a
Poisson process, smaller values are burstier, larger values more regular. ``rate = inf``
sends everything at once.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds between consecutive requests; the first request waits ``gaps[0]``."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be positive, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * count
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count).tolist()


def arrival_offsets(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start of the run at which each request is released.

    The first request goes at 0 so a run never opens with idle time.
    """
    gaps = arrival_gaps(count, rate, burstiness, seed)
    if not gaps:
        return []
    return [0.0, *np.cumsum(gaps[1:]).tolist()]
