"""dit-sparse: sparse attention for video diffusion transformers inside Hugging Face Diffusers pipelines."""

from dit_sparse.api import SparseReport, apply, remove, report
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import (
    AdaSpaConfig,
    DraftConfig,
    Method,
    MethodConfig,
    RadialConfig,
    RettentionConfig,
    SvditConfig,
    WindowConfig,
    available_methods,
    get_method,
    register,
)
from dit_sparse.offline_search import search
from dit_sparse.plan import HEAD_DENSE, HEAD_PLANNED, HEAD_SKIP, BlockPlan
from dit_sparse.processor import DEFAULT_METHOD, SparseProcessor
from dit_sparse.state import StepContext

__version__ = "0.1.0"

__all__ = [
    "AdaSpaConfig",
    "DraftConfig",
    "RadialConfig",
    "RettentionConfig",
    "SvditConfig",
    "WindowConfig",
    "HEAD_DENSE",
    "HEAD_PLANNED",
    "HEAD_SKIP",
    "BlockPlan",
    "DEFAULT_METHOD",
    "Method",
    "MethodConfig",
    "SparseProcessor",
    "SparseReport",
    "StepContext",
    "TokenLayout",
    "apply",
    "available_methods",
    "get_method",
    "register",
    "remove",
    "report",
    "search",
]
