"""The method settings of a run: comma-separated lists of method specs (``dit_sparse.methods.split_method_spec``),
labelled and checked against the registry."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dit_sparse.methods import make_config
from dit_sparse.methods.base import split_method_spec

__all__ = ["MethodSpec", "method_label", "parse_methods", "split_method_list"]


@dataclass(frozen=True)
class MethodSpec:
    """One method setting of a run: its label (what rows and plots show), registered name and parameters."""

    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple | list):
        return ",".join(_fmt_value(x) for x in v)
    return str(v)


def method_label(name: str, params: dict[str, Any]) -> str:
    """``name:key=value;...`` with sorted keys (the spec :func:`split_method_spec` reads back), ``name`` alone
    without parameters."""
    if not params:
        return name
    return name + ":" + ";".join(f"{k}={_fmt_value(v)}" for k, v in sorted(params.items()))


_SPEC_START = re.compile(r"^[A-Za-z_][\w\-]*(:|$)")


def split_method_list(text: str) -> list[str]:
    """Split ``"dense,window:window=1,1,1;tile=2,8,8,radial"`` into method specs.

    Commas separate methods, but a piece that does not start with a name (``1``, ``8;tile=2``) or that is a
    ``key=value`` continues the previous method's setting.
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if _SPEC_START.match(piece) or not specs:
            specs.append(piece)
        elif "=" in piece.split(";", 1)[0]:  # another key=value of the same method
            specs[-1] += ";" + piece
        else:  # the next element of a comma-separated value
            specs[-1] += "," + piece
    return specs


def parse_methods(
    methods: str | Iterable[str | tuple[str, dict[str, Any]] | MethodSpec],
    params: dict[str, dict[str, Any]] | None = None,
    common: dict[str, Any] | None = None,
) -> list[MethodSpec]:
    """Method settings from specs (``"radial"``, ``"window:window=1,1,1;tile=2,8,8"``), ``(name, params)`` pairs
    or :class:`MethodSpec`; ``params[name]`` and ``common`` are added to every setting of that method / of all.

    Names, keys and values are checked against the registry (clear errors list the known ones); an empty list or
    a setting given twice is a ValueError.
    """
    if isinstance(methods, str):
        items: list[Any] = split_method_list(methods)
    elif isinstance(methods, Iterable):
        items = list(methods)
    else:
        raise ValueError(f"methods must be a list of method specs or a comma-separated string, got {methods!r}")
    out: list[MethodSpec] = []
    for item in items:
        if isinstance(item, MethodSpec):
            name, p = item.name, dict(item.params)
        elif isinstance(item, tuple) and len(item) == 2:
            name, p = item[0], dict(item[1])
        elif isinstance(item, str):
            parts = split_method_list(item)
            if len(parts) != 1:
                out.extend(parse_methods(parts, params, common))
                continue
            name, p = split_method_spec(parts[0])
        else:
            raise ValueError(f"bad method setting {item!r}: give a spec string, a (name, params) pair or a MethodSpec")
        p = {**(common or {}), **((params or {}).get(name, {})), **p}
        make_config(name, p)  # validates
        out.append(MethodSpec(item.label if isinstance(item, MethodSpec) else method_label(name, p), name, p))
    if not out:
        raise ValueError("no methods given")
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"method setting(s) given twice: {', '.join(dup)}")
    return out
