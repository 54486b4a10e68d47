"""Autotune results on disk: one JSON file per machine stamp, so that a new process does not retune its kernels.

The stamp (:func:`machine`) is the GPU name, the CUDA driver version, and the torch, triton and dit-sparse versions;
a configuration tuned under one stamp is never used under another. Files live in :func:`cache_folder`: by default
``~/.cache/dit_sparse/tuning``, else the folder named by the environment variable ``DIT_SPARSE_TUNING_CACHE``
(``off`` disables the cache). A file holds::

    {"format": 1, "machine": {...stamp...},
     "kernels": {kernel name: {key as JSON list: {"config": config name, "ms": median}}}}

Keys are tuples of str / int / bool (:func:`key_to_json` keeps their types); a configuration is stored by its name
(``str(config)``) and read back only when the kernel still offers a candidate of that name. Anything else (a corrupt
file, another stamp, a malformed entry, a name no candidate has) is ignored with a warning naming the file, and the
key is retuned. Writes re-read the file and merge (another process may have added keys meanwhile), then replace it
atomically; two processes writing in the same instant can still lose one entry, which is then retuned once.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from dit_sparse.files import atomic_write_json, slug

ENV = "DIT_SPARSE_TUNING_CACHE"
"""Environment variable: the cache folder, or ``off``."""
DEFAULT_FOLDER = Path("~/.cache/dit_sparse/tuning")
FORMAT = 1

C = TypeVar("C")


def cache_folder() -> Path | None:
    """The folder of the tuning files (``$DIT_SPARSE_TUNING_CACHE``, default ``~/.cache/dit_sparse/tuning``), or
    None when the variable is ``off``."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() == "off":
        return None
    return Path(value or DEFAULT_FOLDER).expanduser()


@functools.cache
def machine() -> dict[str, Any]:
    """What a tuned configuration is valid for: GPU name (current device), CUDA driver version, torch, triton and
    dit-sparse versions ("cpu" and None without CUDA)."""
    import torch

    from dit_sparse import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda_driver": _driver_version() if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "dit_sparse": __version__,
    }


def _driver_version() -> str:
    """The NVIDIA driver's version (``/proc/driver/nvidia/version`` on Linux; else the CUDA runtime torch was built
    with, which is all torch itself tells)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        text = ""
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    import torch

    return f"cuda-runtime-{torch.version.cuda}"


def cache_path(folder: Path, stamp: dict[str, Any]) -> Path:
    """The file of ``stamp`` in ``folder`` (its name spells the stamp out)."""
    name = "-".join(f"{k}-{v}" for k, v in stamp.items())
    return folder / f"{slug(name, 200)}.json"


def key_to_json(key: tuple) -> str:
    """``key`` (a tuple of str / int / bool) as a JSON list; a TypeError for any other element."""
    bad = [x for x in key if not isinstance(x, (str, int, bool))]
    if bad:
        raise TypeError(f"tuning keys hold str, int or bool; {key!r} holds {bad!r}")
    return json.dumps(list(key))


def key_from_json(text: str) -> tuple:
    """The key :func:`key_to_json` wrote; a ValueError when ``text`` is not such a list."""
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(x, (str, int, bool)) for x in value):
        raise ValueError(f"not a list of str / int / bool: {text}")
    return tuple(value)


def _warn(path: Path, what: str) -> None:
    warnings.warn(f"tuning cache {path}: {what}; ignored (retuned, the file is rewritten)", stacklevel=3)


def _read(path: Path, stamp: dict[str, Any], warn: bool = True) -> dict[str, dict[str, dict[str, Any]]]:
    """The ``kernels`` table of ``path`` with only its well-formed entries ({} when the file is missing, corrupt or of
    another stamp); what is ignored gets a warning when ``warn``."""

    def ignore(what: str) -> None:
        if warn:
            _warn(path, what)

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        ignore(f"unreadable ({type(e).__name__}: {e})")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("kernels"), dict):
        ignore(f"not a format-{FORMAT} tuning file")
        return {}
    if data.get("machine") != stamp:
        ignore(f"written for {data.get('machine')!r}, this machine is {stamp!r}")
        return {}
    kernels: dict[str, dict[str, dict[str, Any]]] = {}
    for kernel, entries in data["kernels"].items():
        if not isinstance(entries, dict):
            ignore(f"kernel {kernel!r}: entries are not an object")
            continue
        good = kernels[kernel] = {}
        for key, entry in entries.items():
            try:
                key_from_json(key)
                ok = isinstance(entry, dict) and isinstance(entry.get("config"), str)
                ok = ok and isinstance(entry.get("ms"), (int, float)) and not isinstance(entry["ms"], bool)
            except ValueError:
                ok = False
            if ok:
                good[key] = entry
            else:
                ignore(f"kernel {kernel!r}: malformed entry {key!r}: {entry!r}")
    return kernels


class TuningFile:
    """The tuning file of this machine (``path``, ``stamp``); ``None`` from :meth:`current` when the cache is off."""

    def __init__(self, path: Path, stamp: dict[str, Any]) -> None:
        self.path = path
        self.stamp = stamp

    @classmethod
    def current(cls) -> TuningFile | None:
        """The file for :func:`machine` in :func:`cache_folder` (None when the cache is off)."""
        folder = cache_folder()
        if folder is None:
            return None
        stamp = machine()
        return cls(cache_path(folder, stamp), stamp)

    def lookup(self, kernel: str, key: tuple, candidates: Sequence[C]) -> tuple[C, float] | None:
        """The stored configuration of ``key`` among ``candidates`` (matched by name) and its stored time, else None
        (with a warning when the entry names no candidate)."""
        entry = _read(self.path, self.stamp).get(kernel, {}).get(key_to_json(key))
        if entry is None:
            return None
        for cfg in candidates:
            if str(cfg) == entry["config"]:
                return cfg, float(entry["ms"])
        _warn(self.path, f"{kernel} {key}: config {entry['config']!r} is none of {[str(c) for c in candidates]}")
        return None

    def record(self, kernel: str, key: tuple, cfg: Any, ms: float) -> None:
        """Store ``cfg`` (timed ``ms``) for ``key``, merged into the file as it is now; a warning when it cannot be
        written (the result is then only kept in this process)."""
        kernels = _read(self.path, self.stamp, warn=False)  # what it ignores, lookup has warned about
        kernels.setdefault(kernel, {})[key_to_json(key)] = {"config": str(cfg), "ms": ms}
        try:
            atomic_write_json(self.path, {"format": FORMAT, "machine": self.stamp, "kernels": kernels})
        except OSError as e:
            warnings.warn(
                f"tuning cache {self.path}: not written ({e}); set {ENV} to a writable folder, or to off",
                stacklevel=3,
            )


__all__ = [
    "DEFAULT_FOLDER",
    "ENV",
    "TuningFile",
    "cache_folder",
    "cache_path",
    "key_from_json",
    "key_to_json",
    "machine",
]
