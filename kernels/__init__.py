"""Block-sparse attention kernels behind one entry point: ``block_sparse_attention(q, k, v, plan, ...)``.

Backends: ``triton`` (the fast one, CUDA), ``flex`` (torch FlexAttention on the same plan, compiled on CUDA) and
``reference`` (dense masked softmax in torch: the oracle for tests and the CPU path). The same plan gives the same
result on all three.
"""

from dit_sparse.kernels.api import BACKENDS, block_sparse_attention, resolve_backend

__all__ = ["BACKENDS", "block_sparse_attention", "resolve_backend"]
