"""Checks the command runs before it loads a model: the output file, the model folder, the device and backend.

Each failure is a :class:`CLIError`: one line for the user, exit status 2.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch


class CLIError(Exception):
    """A user error: printed as ``dit-sparse <command>: error: ...`` with exit status 2."""


def check_output(path: Path, suffixes: Iterable[str], overwrite: bool, flag: str = "--out") -> Path:
    """``path`` if a file can be written there: a known suffix, a folder above it that exists (or can be made) and
    takes files, and no file already there unless ``overwrite``. Creates missing parent folders."""
    suffixes = tuple(suffixes)
    if path.suffix.lower() not in suffixes:
        raise CLIError(f"{flag} {str(path)!r}: the file must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise CLIError(f"{flag} {str(path)!r} is a folder; give a file name in it")
    if path.exists() and not overwrite:
        raise CLIError(f"{str(path)!r} exists; pass --force to overwrite it")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CLIError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise CLIError(f"{flag} {str(path)!r}: cannot write in {str(parent)!r} ({exc.strerror or exc})") from None
    return path


def verify_written(path: Path) -> Path:
    """``path`` if it is a non-empty file, else a :class:`CLIError`."""
    if not path.is_file() or path.stat().st_size == 0:
        raise CLIError(f"the output {str(path)!r} was not written (missing or empty)")
    return path


def check_model_folder(model: str | None, supported: Iterable[str]) -> Path:
    """The local pipeline folder of ``--model`` (the embedded model when None); local files only, never the hub.
    Its transformer must be one of ``supported`` (class names)."""
    from dit_sparse.eval.run import resolve_model_path  # noqa: PLC0415

    try:
        path = resolve_model_path(model)
    except FileNotFoundError as exc:
        raise CLIError(
            f"{exc}; dit-sparse loads local files only (download a hub model first, e.g. `hf download`)"
        ) from None
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"cannot read {str(path / 'model_index.json')!r}: {exc}") from None
    supported = sorted(supported)
    found = [index[k][1] for k in ("transformer", "transformer_2") if isinstance(index.get(k), list) and index[k][1]]
    bad = [cls for cls in found if cls not in supported]
    if not found or bad:
        raise CLIError(
            f"the pipeline in {str(path)!r} has transformer {', '.join(bad or found) or 'none'}; "
            f"dit-sparse supports {', '.join(supported)}"
        )
    return path


def check_device(device: str | None, backend: str) -> tuple[torch.device, str]:
    """The target device (default: cuda when present) and the backend ``backend`` resolves to on it."""
    from dit_sparse.kernels.api import resolve_backend  # noqa: PLC0415

    try:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise CLIError(f"--device {device!r} is not a device; write cpu, cuda or cuda:N") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            f"--device {device}: no CUDA device is visible here (torch {torch.__version__}); use --device cpu"
        )
    try:
        return target, resolve_backend(backend, target)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"--backend {backend}: {exc}") from None
