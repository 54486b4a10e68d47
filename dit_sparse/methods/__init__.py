"""Sparse-attention methods, registered by name (the names are the public API)."""

from dit_sparse.methods import adaspa, dense, draft, radial, rettention, svdit, window  # noqa: F401  (registration)
from dit_sparse.methods.base import (
    Method,
    MethodConfig,
    available_methods,
    get_method,
    make_config,
    method_class,
    parse_method_spec,
    register,
)

__all__ = [
    "Method",
    "MethodConfig",
    "available_methods",
    "get_method",
    "make_config",
    "method_class",
    "parse_method_spec",
    "register",
]
