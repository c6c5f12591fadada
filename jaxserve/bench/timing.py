"""Statistics of repeated timings, and the engine's readback loop.

Interference on a shared machine only ever adds time, so throughput takes the BEST repeat;
per-step times take the MEDIAN (robust to one slow repeat, and what a step costs typically)."""

from __future__ import annotations

import collections
import statistics
import time

import numpy as np


def best(xs):
    return min(xs) if xs else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def readback_loop(dispatch, iters: int, in_flight: int = 2) -> dict:
    """The engine's pattern: dispatch a step, read back the oldest once `in_flight` are out."""
    queue, marks = collections.deque(), []
    t0 = time.perf_counter()
    for _ in range(iters):
        queue.append(dispatch())
        if len(queue) >= in_flight:
            np.asarray(queue.popleft())
            marks.append(time.perf_counter())
    while queue:
        np.asarray(queue.popleft())
    wall = time.perf_counter() - t0
    gaps = np.diff(marks)
    return {"ms_per_step": wall / iters * 1e3,
            "median_interval_ms": float(np.median(gaps)) * 1e3 if gaps.size else None}
