"""A guard for tests: fail when code reads a device value on the host (a device->host sync on CUDA).

CPU tensors never sync, so the guard patches the Python entry points that would: ``.item()``, ``.tolist()``,
``bool/int/float(tensor)``, using a tensor as a Python index, ``nonzero`` and boolean-mask indexing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class HostSyncError(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside the block, every host read of a tensor value raises :class:`HostSyncError`."""

    def refuse(name: str):
        def fn(*args, **kwargs):
            raise HostSyncError(f"host read of a tensor value: {name}")

        return fn

    getitem = torch.Tensor.__getitem__
    setitem = torch.Tensor.__setitem__

    def _check_index(index) -> None:
        for i in index if isinstance(index, tuple) else (index,):
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                raise HostSyncError("boolean-mask indexing")

    def guarded_getitem(self, index):
        _check_index(index)
        return getitem(self, index)

    def guarded_setitem(self, index, value):
        _check_index(index)
        return setitem(self, index, value)

    patched = {
        "item": refuse("item()"),
        "tolist": refuse("tolist()"),
        "__bool__": refuse("bool(tensor)"),
        "__int__": refuse("int(tensor)"),
        "__float__": refuse("float(tensor)"),
        "__index__": refuse("tensor used as a Python index"),
        "nonzero": refuse("nonzero()"),
        "__getitem__": guarded_getitem,
        "__setitem__": guarded_setitem,
    }
    saved = {name: torch.Tensor.__dict__.get(name) for name in patched}
    nonzero = torch.nonzero
    try:
        for name, fn in patched.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = refuse("torch.nonzero")
        yield
    finally:
        for name, fn in saved.items():
            if fn is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, fn)
        torch.nonzero = nonzero
