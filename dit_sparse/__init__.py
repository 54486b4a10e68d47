"""dit-sparse: sparse attention for video diffusion transformers inside Hugging Face Diffusers pipelines."""

from pathlib import Path as _Path

# A source checkout imported without installing it (run from the repository root, or on PYTHONPATH): the top-level
# folders that pyproject.toml installs as sub-packages (pipelines/, eval/, assets/) are found beside this folder.
_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "pipelines" / "__init__.py").is_file():
    __path__.append(str(_ROOT))

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
