"""FlexAttention backend: torch's ``flex_attention`` with a ``BlockMask`` built from the same BlockPlan.

The BlockMask is built once per plan and batch (kept in the plan's cache) and ``flex_attention`` is compiled on CUDA (eager flex
materialises the whole score matrix, so it is only for CPU tests there).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dit_sparse.kernels.backends import AttentionCall, mask_skipped_heads

try:  # torch >= 2.9 returns the LSE through AuxRequest (return_lse is deprecated there)
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

from dit_sparse.plan import BlockPlan

# Each plan shape (heads, blocks, sequence length) is one more compiled graph; past dynamo's default limit of 8 it
# would silently fall back to eager flex, which materialises the N×N scores (hundreds of GB at video sizes).
_FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _call_compiled_flex(*args, **kwargs):
    """Compiled flex with room for many plan shapes, and an error (never an eager fallback) past that."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=_FLEX_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        return _compiled_flex()(*args, **kwargs)


def plan_to_block_mask(plan: BlockPlan, kv_len: torch.Tensor | None = None) -> BlockMask:
    """FlexAttention BlockMask with the plan's blocks.

    Flex treats ``mask_mod`` as the truth (eager flex applies only it) and the block lists as the places to look:
    so ``mask_mod`` looks the block pair up in the plan, masks the tail and padded keys (``kv_len``), and only the
    blocks that need it (the tail key block, or every block when keys are padded) are marked partial; the others
    are passed as full blocks, which compiled flex computes without calling ``mask_mod``.
    Built once per (plan, batch); ``kv_len`` is copied into a buffer the cached ``mask_mod`` reads.
    """
    batch = None if kv_len is None else kv_len.shape[0]
    bm, buf = plan.derived(("flex", batch), lambda: _build_block_mask(plan, kv_len))
    if buf is not None:
        buf.copy_(kv_len)
    return bm


def _build_block_mask(plan: BlockPlan, kv_len: torch.Tensor | None) -> tuple[BlockMask, torch.Tensor | None]:
    n, bq, bk = plan.seq_len, plan.block_q, plan.block_kv
    blocks = plan.block_mask()  # [B', H', Mq, Mk]
    one_b, one_h = blocks.shape[0] == 1, blocks.shape[1] == 1
    buf = None if kv_len is None else torch.empty_like(kv_len, dtype=torch.int64)
    original = plan.perm if plan.perm is not None else torch.arange(n, device=plan.device)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = blocks[0 if one_b else b, 0 if one_h else h, q_idx // bq, kv_idx // bk] & (kv_idx < n)
        if buf is not None:
            keep = keep & (original[kv_idx] < buf[b])
        return keep

    partial_cols = torch.zeros(plan.num_kv_blocks, dtype=torch.bool, device=plan.device)
    if buf is not None:
        partial_cols[:] = True
    elif n % bk:
        partial_cols[-1] = True
    partial = BlockPlan.from_block_mask(blocks & partial_cols, n, bq, bk)
    full = BlockPlan.from_block_mask(blocks & ~partial_cols, n, bq, bk)
    bm = BlockMask.from_kv_blocks(
        partial.kv_num_blocks,
        partial.kv_indices,
        full.kv_num_blocks,
        full.kv_indices,
        BLOCK_SIZE=(bq, bk),
        mask_mod=mask_mod,
        seq_lengths=(n, n),
    )
    return bm, buf


def flex_block_attention(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``flex`` backend: flex_attention on the permuted tokens, output restored to the original order."""
    q, k, v, plan, scale = call.q, call.k, call.v, call.plan, call.scale
    if plan.perm is not None:
        q, k, v = (x.index_select(2, plan.perm) for x in (q, k, v))
    bm = plan_to_block_mask(plan, call.kv_len)
    fn = _call_compiled_flex if q.is_cuda else flex_attention
    with warnings.catch_warnings():
        # eager flex (CPU) materialises the scores; that is expected here, the warning is noise
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        if AuxRequest is not None:
            out, aux = fn(q, k, v, block_mask=bm, scale=scale, return_aux=AuxRequest(lse=True))
            lse = aux.lse
        else:
            out, lse = fn(q, k, v, block_mask=bm, scale=scale, return_lse=True)
    out, lse = mask_skipped_heads(plan, out, lse.float())
    if plan.perm is not None:
        out, lse = out.index_select(2, plan.inv_perm), lse.index_select(2, plan.inv_perm)
    return out, (lse if call.return_lse else None)
