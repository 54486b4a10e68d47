"""Timing, once for the whole package: lazy CUDA-event durations and a median-of-repeats timer.

``Timer`` records durations without a host sync (CUDA events are read when asked for); ``median_ms`` times a
callable the way the benchmarks do (warm-up calls, then the median of synchronised repeats).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class Timer:
    """Durations in ms: CUDA events read lazily on GPU (no sync when recorded), wall clock on CPU."""

    def __init__(self) -> None:
        self._done: list[float] = []
        self._events: list[tuple[Any, Any]] = []

    @staticmethod
    def start(device: torch.device) -> Any:
        """A start mark on ``device``'s clock (a recorded CUDA event, or ``perf_counter()``)."""
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start: Any) -> None:
        """Record the duration since ``start`` (a mark from :meth:`start`)."""
        if isinstance(start, float):
            self._done.append((time.perf_counter() - start) * 1e3)
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((start, end))

    def values(self) -> list[float]:
        """Every duration recorded so far, in order of completion for CPU and CUDA separately (one sync, if any)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._done.extend(s.elapsed_time(e) for s, e in self._events)
            self._events.clear()
        return list(self._done)

    def total(self) -> float:
        return float(sum(self.values()))


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 10, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls (each call synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        timer = Timer()
        start = Timer.start(device)
        fn()
        timer.stop(start)
        times.append(timer.values()[0])
    return statistics.median(times)
