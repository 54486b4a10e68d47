"""Block scoring and block selection shared by the dynamic methods (``draft``, ``adaspa``).

Scoring: :func:`pool_blocks` (mean q or k per kernel block, DraftAttention's draft tokens) and :func:`block_mass`
(exact softmax mass of every block pair given the rows' log-sum-exp, AdaSpa's search). Selection: a per-head
threshold over a whole map (:func:`select_global`), a per-row count of blocks by rank (:func:`rank_rows` and
:func:`keep_first`), and the blocks every plan keeps (:func:`forced_blocks`: text rows and columns, and each query
block's own diagonal block so that no row is ever empty).

Everything works on whole tensors: no Python loop over blocks or tokens (:func:`block_mass` loops over chunks of
query blocks only) and no device value is read on the host, so a plan can be rebuilt at every call without a sync.
"""

from __future__ import annotations

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.plan import num_blocks

# block_mass: score-matrix elements per chunk of query rows (fp32: 1 GiB), bounds the temporaries
_MASS_CHUNK_ELEMENTS = 1 << 28
# block_mass: exponent cap; a cached LSE is the row's LSE of an earlier step, so q·k·scale - LSE stays small, and
# the cap only keeps a badly stale one from overflowing float32
_EXP_CAP = 30.0


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


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax mass of every (query block, key block) pair: ``sum exp(scale · q·k - lse_row)`` over the pair's tokens.

    With ``lse`` (float32 ``[B, H, N]``, e.g. cached from an earlier dense pass) the scores are normalised by it, as a
    single streaming pass would have to (AdaSpa's LSE-cached search); without, each row's exact LSE is computed here.
    A row's masses sum to 1 when its LSE is exact. Plain torch, chunked over query blocks (one chunk's scores at a
    time); not fused yet. The q·kᵀ product runs in the inputs' dtype (tensor cores for bf16/fp16, float32
    accumulation, scores rounded to that dtype: enough to rank blocks), the softmax terms in float32.
    Returns ``mass`` (float32 ``[B, H, Mq, Mk]``) and the LSE used.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    m = num_blocks(n, block)
    whole = (n // block) * block
    kt = (k if k.dtype in (torch.float16, torch.bfloat16) else k.float()).transpose(-1, -2)
    mass = torch.empty(b, h, m, m, dtype=torch.float32, device=q.device)
    lse_out = torch.empty(b, h, n, dtype=torch.float32, device=q.device) if lse is None else lse
    rows = max(block, _MASS_CHUNK_ELEMENTS // max(1, b * h * n) // block * block)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s = q[:, :, r0:r1].to(kt.dtype) @ kt  # [B, H, R, N]
        if lse is None:
            s = s.float().mul_(scale)
            row_lse = torch.logsumexp(s, dim=-1)
            lse_out[:, :, r0:r1] = row_lse
            p = s.sub_(row_lse[..., None])
        else:  # one float32 pass: scale · s - lse
            p = torch.add(-lse[:, :, r0:r1, None], s, alpha=scale)
        p = p.clamp_(max=_EXP_CAP).exp_()
        cols = p[..., :whole].reshape(b, h, r1 - r0, whole // block, block).sum(-1)
        if whole < n:
            cols = torch.cat([cols, p[..., whole:].sum(-1, keepdim=True)], dim=-1)  # [B, H, R, M]
        pad = -(r1 - r0) % block
        if pad:
            cols = torch.nn.functional.pad(cols, (0, 0, 0, pad))
        mass[:, :, r0 // block : num_blocks(r1, block)] = cols.view(b, h, -1, block, m).sum(3)
    return mass, lse_out
