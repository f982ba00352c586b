"""Median device time of a callable, for the GPU benchmarks (wall time on a machine without CUDA)."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median ms of `repeats` calls of `fn` after `warmup` untimed ones: CUDA events around each
    call on a GPU, the wall clock otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
