"""Block scoring and block selection shared by the dynamic methods (``draft``, ``adaspa``).

Scoring: :func:`pool_blocks` (mean q or k per kernel block, DraftAttention's draft tokens); AdaSpa's exact block
mass is a kernel (:func:`dit_sparse.kernels.block_mass.block_mass`). Selection: a per-head threshold over a whole map
(:func:`select_global`), a per-row count of blocks by rank (:func:`rank_rows` and :func:`keep_first`), and the blocks
every plan keeps (:func:`forced_blocks`: text rows and columns, and each query block's own diagonal block so that no
row is ever empty).

Everything works on whole tensors: no Python loop over blocks or tokens and no device value is read on the host, so
a plan can be rebuilt at every call without a sync.
"""

from __future__ import annotations

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.plan import num_blocks


def keep_count(fraction: float, total: int) -> int:
    """Number of items (at least 1, at most ``total``) that keeps ``fraction`` of ``total`` (host arithmetic)."""
    return min(total, max(1, round(fraction * total)))


def pool_blocks(x: torch.Tensor, block: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 mean of ``x`` ``[B, H, N, D]`` over each run of ``block`` consecutive tokens of ``x[:, :, index]``.

    ``index`` (default ``arange(N)``) lists the tokens to pool, in order; only whole blocks are pooled (a trailing
    partial block of ``index`` is ignored). Returns ``[B, H, len(index) // block, D]``.
    """
    b, h, n, d = x.shape
    if index is not None:
        x = x.index_select(2, index)
        n = index.numel()
    m = n // block
    return x[:, :, : m * block].reshape(b, h, m, block, d).sum(3, dtype=torch.float32) / block


def text_blocks(
    layout: TokenLayout, block: int, perm: torch.Tensor | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``[M]``: block ``j`` of the sequence (after ``perm``) holds at least one text token."""
    is_text = layout.is_text(device=perm.device if perm is not None else device)
    if perm is not None:
        is_text = is_text[perm]
    m = num_blocks(layout.seq_len, block)
    padded = torch.zeros(m * block, dtype=torch.bool, device=is_text.device)
    padded[: is_text.numel()] = is_text
    return padded.view(m, block).any(-1)


def forced_blocks(text: torch.Tensor, diagonal: bool = True) -> torch.Tensor:
    """Bool ``[M, M]`` of block pairs every plan keeps: text rows, text columns and (``diagonal``) the diagonal."""
    m = text.numel()
    forced = text[:, None] | text[None, :]
    if diagonal:
        forced = forced | torch.eye(m, dtype=torch.bool, device=text.device)
    return forced


def select_global(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping the ``keep`` largest entries of each ``[..., Mq, Mk]`` map (one threshold per map; ties at
    the threshold are all kept)."""
    flat = scores.flatten(-2)
    n = flat.shape[-1]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must lie in [1, {n}], got {keep}")
    threshold = torch.kthvalue(flat, n - keep + 1, dim=-1).values  # the keep-th largest
    return scores >= threshold[..., None, None]


def rank_rows(scores: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank each row's blocks by score, ``forced`` blocks first.

    Returns ``order`` (int64, the column of each rank) and ``cum`` (float32, the running sum of the scores in rank
    order: ``cum[..., k - 1]`` is the score captured by the first ``k`` ranks).
    """
    key = scores if forced is None else scores.masked_fill(forced, float("inf"))
    order = torch.argsort(key, dim=-1, descending=True)
    cum = scores.gather(-1, order).float().cumsum(-1)
    return order, cum


def keep_first(order: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Bool mask (shape of ``order``) keeping the first ``k`` ranks of every row; ``k`` is an int or a tensor that
    broadcasts against ``order.shape[:-2]`` (e.g. one count per (batch, head))."""
    mk = order.shape[-1]
    k = torch.as_tensor(k, device=order.device)
    ranks = torch.arange(mk, device=order.device) < k[..., None, None]
    return torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter_(
        -1, order, ranks.expand(order.shape)
    )
