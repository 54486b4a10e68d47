"""Autotune results of one kernel: the fastest launch configuration per key, what was timed, the last one used.

Each Triton kernel owns one :class:`Tuner`. The first call with a new key times every candidate configuration and
keeps the fastest; later calls with that key reuse it. Keys are tuples (or named tuples) of str / int / bool and
configurations frozen dataclasses, so that the results can be stored per machine (GPU name, driver, torch and
triton versions) and loaded back without retuning.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class Tuner(Generic[C]):
    """Best configuration per key, the tuning log and the last configuration used, for the kernel ``kernel``.

    Attributes:
        kernel: the kernel's name (messages, and the file name a stored tuner would use).
        best: key → the fastest configuration timed for it.
        log: one dict per configuration timed: ``key``, ``config``, and ``ms`` (median) or ``error``, plus what the
            kernel adds (e.g. the shape).
        last: the configuration of the latest launch (benchmarks), None before any.
    """

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel
        self.best: dict[tuple, C] = {}
        self.log: list[dict[str, Any]] = []
        self.last: C | None = None

    def pick(
        self,
        key: tuple,
        candidates: Sequence[C],
        time_ms: Callable[[C], float],
        **details: Any,
    ) -> C:
        """The fastest of ``candidates`` for ``key``: cached, else each is timed once with ``time_ms(config)``.

        A candidate whose timing raises (does not compile, does not fit in shared memory) is logged and skipped;
        a RuntimeError when none runs. ``details`` go into each log entry.
        """
        if key in self.best:
            return self.best[key]
        times: dict[C, float] = {}
        for cfg in candidates:
            entry: dict[str, Any] = {"key": str(key), "config": str(cfg), **details}
            try:
                times[cfg] = entry["ms"] = float(time_ms(cfg))
            except Exception as e:  # noqa: BLE001 - any failure of a candidate only removes it from the race
                entry["error"] = f"{type(e).__name__}: {e}"[:300]
            self.log.append(entry)
        if not times:
            raise RuntimeError(f"no {self.kernel} configuration ran for {key}; see its tuner's log")
        self.best[key] = min(times, key=times.__getitem__)
        return self.best[key]

    def used(self, cfg: C) -> C:
        """Record ``cfg`` as the latest launch's configuration and return it."""
        self.last = cfg
        return cfg

    def forget(self, which: Callable[[tuple], bool]) -> None:
        """Drop the cached best configurations whose key ``which`` accepts (they are retuned on their next call)."""
        for key in [key for key in self.best if which(key)]:
            del self.best[key]

    def __repr__(self) -> str:
        return f"Tuner({self.kernel!r}: {len(self.best)} keys tuned, {len(self.log)} timings)"


__all__ = ["Tuner"]
