"""Reference backend: dense masked attention that honours a BlockPlan exactly (the oracle for tests, the CPU path).

With ``return_lse`` it computes the masked softmax itself in float32 (row chunks bound the memory); without, it hands
the same token mask to torch's SDPA, which computes exactly the same function faster on the CPU. The token mask of a
plan is built once per plan object and cached beside it.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from dit_sparse.kernels.api import skip_head_mask
from dit_sparse.plan import BlockPlan

# query rows per chunk are chosen so that one chunk's score matrix stays near this many elements
_CHUNK_ELEMENTS = 1 << 26

_token_masks: weakref.WeakKeyDictionary[BlockPlan, torch.Tensor] = weakref.WeakKeyDictionary()


def _token_mask(plan: BlockPlan) -> torch.Tensor:
    mask = _token_masks.get(plan)
    if mask is None:
        mask = _token_masks[plan] = plan.to_dense_mask()  # [B', H', N, N]; skipped heads are all False
    return mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scale: float,
    return_lse: bool,
    kv_len: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked attention with the plan's token mask (original order). Rows with no allowed key give 0 and LSE -inf."""
    b, h, n, _ = q.shape
    mask = _token_mask(plan)
    if kv_len is not None:
        keep = torch.arange(n, device=q.device)[None, :] < kv_len.to(q.device)[:, None]  # [B, N]
        mask = mask & keep[:, None, None, :]
    if not return_lse:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        skip = skip_head_mask(plan, q.device)
        return (out if skip is None else out.masked_fill(skip.view(1, -1, 1, 1), 0.0)), None
    mask = mask.expand(b, h, n, n)
    qf, kf, vf = q.float(), k.float(), v.float()
    out = torch.empty(b, h, n, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * h * n))
    for s in range(0, n, rows):
        scores = (qf[:, :, s : s + rows] @ kf.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask[:, :, s : s + rows], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse.nan_to_num(neginf=0.0).unsqueeze(-1))
        out[:, :, s : s + rows] = probs @ vf
        lse[:, :, s : s + rows] = row_lse
    return out.to(q.dtype), lse
