"""Timing shared by the benchmark scripts: median wall time after warm-up."""

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of `reps` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
