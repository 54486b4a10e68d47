"""``dit_sparse::block_sparse_attention``: the kernel entry point as a ``torch.library`` custom op.

:func:`dit_sparse.kernels.block_sparse_attention` called inside code that ``torch.compile`` traces goes through this
op instead of running the backends' Python: the op is opaque to the compiler (no graph break), its fake
implementation gives the output shapes (``out`` in the memory layout of ``q``, ``lse`` float32 ``[B, H, N]``), and
its real implementation is the eager entry point. The plan travels as its tensors plus constants; the op finds the
plan object they belong to (so that a backend's preprocessed form, kept in the plan's cache, is reused) and builds
an equal plan from them otherwise.
"""

from __future__ import annotations

import torch

from dit_sparse.plan import BlockPlan


@torch.library.custom_op("dit_sparse::block_sparse_attention", mutates_args=())
def _op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    perm: torch.Tensor | None,
    inv_perm: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    block_q: int,
    block_kv: int,
    head_mode: list[int] | None,
    density_hint: float | None,
    scale: float,
    backend: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from dit_sparse.kernels.api import block_sparse_attention

    plan = BlockPlan.owning(kv_num_blocks, kv_indices)
    if plan is None:
        plan = BlockPlan(
            q.shape[-2], block_q, block_kv, kv_num_blocks, kv_indices, perm=perm, inv_perm=inv_perm,
            head_mode=None if head_mode is None else tuple(head_mode), density_hint=density_hint,
        )  # fmt: skip
    out, lse = block_sparse_attention(
        q, k, v, plan, scale=scale, return_lse=True, backend=backend, kv_len=kv_len, precision=precision
    )
    like = torch.empty_like(q)
    if out.stride() != like.stride():  # the fake's strides are what the compiled graph assumes
        out = like.copy_(out)
    return out, lse


@_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, perm, inv_perm, kv_len, block_q, block_kv, head_mode, density_hint, scale,
      backend, precision):  # fmt: skip
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def traced_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scale: float,
    backend: str,
    kv_len: torch.Tensor | None,
    precision: str = "bf16",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op call for ``plan`` (what :func:`~dit_sparse.kernels.block_sparse_attention` does under tracing)."""
    head_mode = None if plan.head_mode is None else list(plan.head_mode)
    return _op(
        q, k, v, plan.kv_num_blocks, plan.kv_indices, plan.perm, plan.inv_perm, kv_len, plan.block_q, plan.block_kv,
        head_mode, plan.density_hint, scale, backend, precision,
    )  # fmt: skip
