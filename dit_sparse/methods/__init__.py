"""Sparse-attention methods, registered by name (the names are the public API), with their config classes."""

from dit_sparse.methods import (  # noqa: F401  (registration)
    adaspa,
    dense,
    draft,
    radial,
    rettention,
    ssa,
    svdit,
    window,
    window3d,
)
from dit_sparse.methods.adaspa import AdaSpaConfig
from dit_sparse.methods.base import (
    METHODS,
    Method,
    MethodConfig,
    available_methods,
    get_method,
    make_config,
    method_class,
    parse_method_spec,
    parse_value,
    register,
    split_method_spec,
)
from dit_sparse.methods.draft import DraftConfig
from dit_sparse.methods.radial import RadialConfig
from dit_sparse.methods.rettention import RettentionConfig
from dit_sparse.methods.ssa import SsaConfig
from dit_sparse.methods.svdit import SvditConfig
from dit_sparse.methods.window import WindowConfig
from dit_sparse.methods.window3d import Window3dConfig

__all__ = [
    "METHODS",
    "AdaSpaConfig",
    "DraftConfig",
    "Method",
    "MethodConfig",
    "RadialConfig",
    "RettentionConfig",
    "SsaConfig",
    "SvditConfig",
    "Window3dConfig",
    "WindowConfig",
    "available_methods",
    "get_method",
    "make_config",
    "method_class",
    "parse_method_spec",
    "parse_value",
    "register",
    "split_method_spec",
]
