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

**Shipped tables.** The package ships tuned tables (``dit_sparse/kernels/tuned/*.json``, made with ``dit-sparse tune
--export``, which adds this machine's entries to the shipped table) for the shapes its benchmarks use. A table is
stamped with the GPU name and the triton version only (:func:`table_stamp`): the configuration choice does not
depend on the driver or torch. A key missing from this machine's file is looked up in the table of the same GPU
name and triton major.minor (the file named after that stamp; tables of other GPUs are never read) before it is
timed; a table's answer is not copied into the machine's file. ``DIT_SPARSE_TUNED_TABLES=off`` ignores the tables
(e.g. to time an untuned cold start). A malformed table is ignored with a warning, like a malformed file.
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
TABLES_ENV = "DIT_SPARSE_TUNED_TABLES"
"""Environment variable: ``off`` ignores the shipped tuned tables."""
TABLES_FOLDER = Path(__file__).parent / "tuned"
"""Where the shipped tuned tables live (package data)."""
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
    another stamp than ``stamp``); what is ignored gets a warning when ``warn``."""

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

    def lookup(self, kernel: str, key: tuple, candidates: Sequence[C]) -> tuple[C, float, Path] | None:
        """The stored configuration of ``key`` among ``candidates`` (matched by name), its stored time and the file
        it came from: this machine's file, else the shipped table (:func:`shipped_table`); None when neither has it
        (with a warning when an entry names no candidate)."""
        table = shipped_table()
        sources = [(self.path, self.stamp)] + ([] if table is None else [(table, table_stamp())])
        for path, stamp in sources:
            entry = _read(path, stamp).get(kernel, {}).get(key_to_json(key))
            if entry is None:
                continue
            for cfg in candidates:
                if str(cfg) == entry["config"]:
                    return cfg, float(entry["ms"]), path
            _warn(path, f"{kernel} {key}: config {entry['config']!r} is none of {[str(c) for c in candidates]}")
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


def table_stamp() -> dict[str, Any]:
    """What a shipped table is valid for: this machine's GPU name and triton major.minor."""
    stamp = machine()
    triton = stamp["triton"]
    return {"gpu": stamp["gpu"], "triton": ".".join(triton.split(".")[:2]) if triton else None}


def shipped_table() -> Path | None:
    """The shipped tuned table of this machine's :func:`table_stamp` in :data:`TABLES_FOLDER`, if the package has
    one (None too when ``DIT_SPARSE_TUNED_TABLES=off``)."""
    if os.environ.get(TABLES_ENV, "").strip().lower() == "off":
        return None
    path = cache_path(TABLES_FOLDER, table_stamp())
    return path if path.exists() else None


def export_table(folder: Path, source: Path | None = None) -> Path:
    """Write this machine's tuning file (or ``source``, a tuning file of this machine's stamp) into ``folder`` as a
    shippable table stamped with :func:`table_stamp` (named after it), merged into the shipped table of that stamp
    when the package has one (an entry of the file wins over the table's: it was timed on this machine, after the
    table was made); returns its path. Refuses to overwrite it."""
    if source is None:
        current = TuningFile.current()
        source = current.path if current is not None else None
    if source is None:
        raise ValueError(f"the tuning cache is off ({ENV}=off): there is no tuning file to export")
    kernels = _read(source, machine())
    if not any(kernels.values()):
        raise ValueError(f"no tuned entries for this machine in {source}; run dit-sparse tune first")
    path = cache_path(folder, table_stamp())
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another folder")
    table = shipped_table()
    merged = _read(table, table_stamp()) if table is not None else {}
    for kernel, entries in kernels.items():
        merged.setdefault(kernel, {}).update(entries)
    atomic_write_json(path, {"format": FORMAT, "machine": table_stamp(), "kernels": merged})
    return path


__all__ = [
    "DEFAULT_FOLDER",
    "ENV",
    "TABLES_ENV",
    "TABLES_FOLDER",
    "TuningFile",
    "cache_folder",
    "cache_path",
    "export_table",
    "key_from_json",
    "key_to_json",
    "machine",
    "shipped_table",
    "table_stamp",
]
