"""Files the package writes: output names, atomic writes, and the environment stamped into results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any


def slug(text: str, n: int = 40, empty: str = "x") -> str:
    """``text`` as a lower-case file-name piece of at most ``n`` characters (``empty`` if nothing is left)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:n].strip("-") or empty


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """:func:`atomic_write_text` of ``data`` as JSON (non-JSON values written with ``str``), newline-terminated."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def environment() -> dict[str, Any]:
    """Device, library versions and date, as results files record them."""
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
