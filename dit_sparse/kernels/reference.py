"""Reference backend: dense masked attention that honours a BlockPlan exactly (the oracle for tests, the CPU path).

It runs over chunks of query rows (original token order). Each chunk's token mask ``[B', H', R, N]`` is expanded
from the plan's block mask through two per-token block indices (kept with the plan: O(Mq·Mk + N)), so neither the
``N × N`` token mask nor the ``N × N`` scores ever exist. With ``return_lse`` a chunk's masked softmax is computed
here in float32; without, the chunk goes to torch's SDPA with its mask, which computes the same function faster.
``precision="fp8"`` runs the torch emulation of the fp8 kernel's quantization
(:func:`~dit_sparse.kernels.quant.emulate_fp8_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_sparse.kernels.backends import AttentionCall, mask_skipped_heads
from dit_sparse.kernels.quant import emulate_fp8_attention
from dit_sparse.plan import BlockPlan

# query rows per chunk are chosen so that one chunk's score matrix stays near this many elements
_CHUNK_ELEMENTS = 1 << 26


def _token_blocks(plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block mask ``[B', H', Mq, Mk]`` and, per token in original order, its query block and its key block."""
    position = torch.arange(plan.seq_len, device=plan.device)
    if plan.inv_perm is not None:
        position = plan.inv_perm  # original token i sits at permuted position inv_perm[i]
    return plan.block_mask(), position // plan.block_q, position // plan.block_kv


def reference_attention(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked attention with the plan's token mask, chunk by chunk. Rows with no allowed key give 0 and LSE -inf."""
    if call.precision == "fp8":
        return emulate_fp8_attention(call)
    q, k, v, scale = call.q, call.k, call.v, call.scale
    b, h, n, _ = q.shape
    blocks, q_block, kv_block = call.plan.derived("reference", lambda: _token_blocks(call.plan))
    keys = None
    if call.kv_len is not None:
        keys = (torch.arange(n, device=q.device)[None, :] < call.kv_len[:, None])[:, None, None, :]  # [B, 1, 1, N]
    exact = call.return_lse
    if exact:
        q, k, v = q.float(), k.float(), v.float()
        lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * h * n))
    for s in range(0, n, rows):
        mask = blocks[:, :, q_block[s : s + rows]][..., kv_block]  # [B', H', R, N]
        if keys is not None:
            mask = mask & keys
        if not exact:
            out[:, :, s : s + rows] = F.scaled_dot_product_attention(q[:, :, s : s + rows], k, v, attn_mask=mask,
                                                                     scale=scale)  # fmt: skip
            continue
        scores = (q[:, :, s : s + rows] @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse.nan_to_num(neginf=0.0).unsqueeze(-1))
        out[:, :, s : s + rows] = probs @ v
        lse[:, :, s : s + rows] = row_lse
    out, lse = mask_skipped_heads(call.plan, out.to(call.q.dtype), lse if exact else None)
    return out, lse
