"""Autotune results of one kernel: the fastest launch configuration per key, what was timed, the last one used.

Each Triton kernel owns one :class:`Tuner`. The first call with a new key times every candidate configuration and
keeps the fastest; later calls with that key reuse it. Keys are tuples (or named tuples) of str / int / bool and
configurations frozen dataclasses named by ``str``. A persistent tuner (the kernels') stores its results on disk per
machine (GPU name, driver, torch, triton and dit-sparse versions, see :mod:`~dit_sparse.kernels.tuning_cache`) and
reads a key's stored result back on its first use in a process instead of timing it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from dit_sparse.kernels.tuning_cache import TuningFile

C = TypeVar("C", bound=Hashable)


class Tuner(Generic[C]):
    """Best configuration per key, the tuning log and the last configuration used, for the kernel ``kernel``.

    Attributes:
        kernel: the kernel's name (messages, and the file name a stored tuner would use).
        best: key → the fastest configuration timed for it.
        log: one dict per configuration timed: ``key``, ``config``, and ``ms`` (median) or ``error``, plus what the
            kernel adds (e.g. the shape); a configuration read from the tuning file or a shipped table instead has
            ``cached`` (that file) and ``stored_ms`` in place of ``ms``.
        last: the configuration of the latest launch (benchmarks), None before any.
        persist: whether results are read from and written to the tuning file (default False; the kernels' are).
    """

    def __init__(self, kernel: str, persist: bool = False) -> None:
        self.kernel = kernel
        self.persist = persist
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
        """The fastest of ``candidates`` for ``key``: cached, else stored in the tuning file or a shipped table
        (persistent tuners, more than one candidate), else each is timed once with ``time_ms(config)`` (and the
        winner stored in the tuning file).

        A candidate whose timing raises (does not compile, does not fit in shared memory) is logged and skipped;
        a RuntimeError when none runs. ``details`` go into each log entry. Only a key's first use reads the
        environment and the file.
        """
        if key in self.best:
            return self.best[key]
        file = TuningFile.current() if self.persist and len(candidates) > 1 else None
        stored = file.lookup(self.kernel, key, candidates) if file is not None else None
        if stored is not None:
            cfg, ms, path = stored
            self.log.append({"key": str(key), "config": str(cfg), **details, "cached": str(path), "stored_ms": ms})
            self.best[key] = cfg
            return cfg
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
        best = self.best[key] = min(times, key=times.__getitem__)
        if file is not None:
            file.record(self.kernel, key, best, times[best])
        return best

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
