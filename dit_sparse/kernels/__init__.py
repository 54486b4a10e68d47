"""Block-sparse attention kernels behind one entry point: ``block_sparse_attention(q, k, v, plan, ...)``.

Backends (declared in ``backends.py``, in ``auto``'s order of preference): ``triton`` (the fast one, CUDA),
``flex`` (torch FlexAttention on the same plan, compiled on CUDA) and ``reference`` (dense masked softmax in torch,
chunked over query rows: the oracle for tests and the CPU path). The same plan gives the same result on all three.
"""

from dit_sparse.kernels.api import BACKENDS, block_sparse_attention, check_backend, resolve_backend
from dit_sparse.kernels.backends import ATTENTION_BACKENDS, AttentionCall, Backend

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionCall",
    "BACKENDS",
    "Backend",
    "block_sparse_attention",
    "check_backend",
    "resolve_backend",
]
