"""What a run keeps on disk: the rows file (``results.jsonl``, one JSON object a line, resumable), the run folder's
lock, the dense reference cache and the names of the side-by-side videos.

A row is identified by every setting that changes its numbers (:data:`KEY_FIELDS`, plus ``error_sample``: see
:func:`satisfies`), so a rerun with another dtype, device, backend or model never takes an old row for its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dit_sparse.files import atomic_write_json, slug

__all__ = [
    "KEY_FIELDS",
    "DenseCache",
    "RunFolderBusy",
    "RunLock",
    "append_row",
    "jsonable",
    "load_rows",
    "repair_tail",
    "row_key",
    "satisfies",
    "video_name",
]

#: The row fields that together say which result a row is (the device by its type, ``cuda:1`` = ``cuda``).
KEY_FIELDS = (
    "model_id",
    "fingerprint",
    "prompt",
    "seed",
    "label",
    "method",
    "params",
    "settings",
    "dtype",
    "device",
    "device_name",
    "backend",
)


def jsonable(v: Any) -> Any:
    """``v`` as JSON data: infinities as ``"inf"`` / ``"-inf"``, NaN as None, tuples as lists, numpy scalars as
    Python numbers."""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return None
        return v
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return jsonable(v.item())
    return v


def row_key(row: dict[str, Any]) -> str:
    """The identity of a row (or of the row a run is about to make) as text: its :data:`KEY_FIELDS`."""
    key = {k: jsonable(row.get(k)) for k in KEY_FIELDS}
    key["device"] = str(key["device"] or "").split(":")[0]
    return json.dumps(key, sort_keys=True)


def satisfies(row: dict[str, Any], error_sample: int) -> bool:
    """Whether ``row`` serves a run asking for ``error_sample``: the same sampling, or any when the run measures no
    attention error (0; the timed generation is the same either way, errors are measured in a separate pass)."""
    got = row.get("error_sample")
    return isinstance(got, int) and (got == error_sample or error_sample == 0)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def load_rows(path: Path, warn: Callable[[str], None] = _warn) -> list[dict[str, Any]]:
    """The rows of a results file (none if it does not exist). A line that is not a JSON object with a ``label``
    (``{}``, ``null``, a list, text, a line cut short by a crash) is skipped with a warning naming ``path:line``."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            cut = number == text.count("\n") + 1  # the last line, with no newline: a write cut short
            warn(f"{path}:{number}: {'an incomplete last line' if cut else 'not JSON'}, skipped (its row is redone)")
            continue
        if not isinstance(row, dict) or "label" not in row:
            warn(f"{path}:{number}: not a result row ({line.strip()[:40]}), skipped")
            continue
        rows.append(row)
    return rows


def repair_tail(path: Path) -> str | None:
    """End a results file with a newline: a last line cut short by a crash (not JSON) is removed, a whole one is
    kept. Returns what was done (None: nothing to do)."""
    if not path.exists():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        os.truncate(path, start)
        return f"removed an incomplete last line of {path} ({len(data) - start} bytes, a write cut short); redone"
    with path.open("ab") as f:
        f.write(b"\n")
    return None


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line (on a line of its own even after a cut-short one), flushed to disk."""
    with path.open("a+b") as f:
        f.seek(0, os.SEEK_END)
        start_line = b""
        if f.tell():
            f.seek(-1, os.SEEK_END)
            start_line = b"" if f.read(1) == b"\n" else b"\n"
        f.write(start_line + json.dumps(jsonable(row)).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


class RunFolderBusy(RuntimeError):
    """Another run holds the lock of this run folder."""


class RunLock:
    """An exclusive lock on a run folder (``fcntl.flock`` on ``<folder>/.eval.lock``), held by one run at a time;
    taking a held one raises :class:`RunFolderBusy` at once. Released when the run ends (or its process dies)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / ".eval.lock"
        self._file: Any = None

    def __enter__(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise RunFolderBusy(
                f"run folder {str(self.folder)!r} is busy: another eval run (pid {holder}) is writing to it; "
                "wait for it to finish or use another output folder"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def video_name(prompt: str, label: str, key: str) -> str:
    """The side-by-side video's file name: readable slugs of the prompt and label, then a hash of the row's whole
    key, so that two settings never share a name (however long and alike their labels)."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"{slug(prompt, 32)}__{slug(label, 48)}-{digest}.mp4"


class DenseCache:
    """Dense reference videos on disk: ``<dir>/<key>.npz`` (uint8 video) + ``<key>.json`` (what made it)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    @staticmethod
    def key(meta: dict[str, Any]) -> str:
        return hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, meta: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]] | None:
        k = self.key(meta)
        vid, info = self.dir / f"{k}.npz", self.dir / f"{k}.json"
        if not (vid.exists() and info.exists()):
            return None
        try:
            with np.load(vid) as z:
                video = z["video"]
            return video, json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None

    def put(self, meta: dict[str, Any], video: np.ndarray, info: dict[str, Any]) -> None:
        """Store a reference (the video first, its description last: a half-stored one is never read)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        k = self.key(meta)
        tmp = self.dir / f".{k}.{os.getpid()}.tmp.npz"
        np.savez_compressed(tmp, video=video)
        os.replace(tmp, self.dir / f"{k}.npz")
        atomic_write_json(self.dir / f"{k}.json", jsonable({**meta, **info}))
