"""dit-sparse: sparse attention for video diffusion transformers inside Hugging Face Diffusers pipelines."""

from dit_sparse.layout import TokenLayout
from dit_sparse.methods import Method, MethodConfig, available_methods, get_method, register
from dit_sparse.plan import HEAD_DENSE, HEAD_PLANNED, HEAD_SKIP, BlockPlan
from dit_sparse.state import StepContext

__version__ = "0.1.0"

__all__ = [
    "HEAD_DENSE",
    "HEAD_PLANNED",
    "HEAD_SKIP",
    "BlockPlan",
    "Method",
    "MethodConfig",
    "StepContext",
    "TokenLayout",
    "available_methods",
    "get_method",
    "register",
]
