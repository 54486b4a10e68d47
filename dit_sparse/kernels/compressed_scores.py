"""SSA's compressed scores: per (query block, key block), the mean over the query block of ``softmax(q k̄ᵀ / √D)``.

``ssa`` (:mod:`dit_sparse.methods.ssa`) ranks key blocks by these scores: ``k̄`` are the ``M`` mean-pooled key blocks,
every query token takes a softmax over them and a query block's row is the mean of its tokens' rows (each row of
the result sums to 1). Entry point :func:`compressed_scores`, two backends:

- ``triton``: one fused launch. A program owns one query block (a sub-tile of it for blocks above 128 tokens),
  gathers its queries through ``perm``, makes two passes over the ``M`` compressed keys (an online max and sum of
  exponentials per row, then the probabilities summed over the block's rows) and writes one row of ``M`` floats:
  the ``N × M`` probabilities never reach memory (at 50,000 tokens, 16 heads and ``M = 782`` they are 2.5 GB of
  float32). ``q·k̄ᵀ`` is computed in the inputs' dtype (``k̄`` rounded to it) with float32 accumulation; float32
  inputs multiply in IEEE float32 (no TF32).
- ``reference``: plain torch in float32, in head chunks of bounded memory: the oracle for tests and the CPU path.

``auto`` (default) is ``triton`` on CUDA (an error naming the install when Triton is missing: no silent fallback)
and ``reference`` elsewhere; ``triton`` on CPU runs in Triton's interpreter when ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import importlib.util

import torch

from dit_sparse.kernels.api import check_backend

_SCORE_BYTES = 256 << 20  # reference: float32 probabilities computed at once (bounds the temporaries)
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256  # triton: larger head dims would spill the query tile out of registers


def compressed_scores(
    q: torch.Tensor,
    k_mean: torch.Tensor,
    block: int,
    perm: torch.Tensor,
    counts: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Float32 ``[B, H, M, M]``: for each query block, the mean over its queries of ``softmax(q k̄ᵀ / √D)``.

    Args:
        q: ``[B, H, N, D]`` queries in the original token order, float16 / bfloat16 / float32.
        k_mean: ``[B, H, M, D]`` compressed keys (float32 block means, :func:`dit_sparse.methods.ssa.block_means`).
        block: tokens per block; block ``i`` holds the tokens ``perm[i * block : (i + 1) * block]`` (the last one
            may be partial).
        perm: ``[N]`` int64 token order (blocks are consecutive in it).
        counts: float32 ``[M]``: tokens per block.
        backend: ``auto`` (``triton`` on CUDA, ``reference`` elsewhere), ``triton`` or ``reference``.
    """
    if q.dim() != 4 or k_mean.dim() != 4 or k_mean.shape[:2] != q.shape[:2] or k_mean.shape[-1] != q.shape[-1]:
        raise ValueError(f"q must be [B, H, N, D] and k_mean [B, H, M, D]; got {tuple(q.shape)}, {tuple(k_mean.shape)}")
    m = counts.numel()
    if k_mean.shape[2] != m or perm.shape != (q.shape[2],) or -(-q.shape[2] // block) != m:
        raise ValueError(
            f"block {block}, perm {tuple(perm.shape)}, counts ({m},) and k_mean {tuple(k_mean.shape)} do not describe "
            f"the {q.shape[2]} tokens of q: M = ceil(N / block) blocks are needed"
        )
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"compressed_scores backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" else "reference"
    if backend == "triton":
        check_backend("triton", q.device)  # a clear error when Triton is missing or cannot run on this device
        return triton_compressed_scores(q, k_mean, block, perm, counts)
    return reference_compressed_scores(q, k_mean, block, perm, counts)


def reference_compressed_scores(
    q: torch.Tensor, k_mean: torch.Tensor, block: int, perm: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """:func:`compressed_scores` in plain float32 torch, in head chunks (the ``reference`` backend)."""
    b, h, n, d = q.shape
    m = counts.numel()
    qp = q.index_select(2, perm)
    per_head = b * n * m * 4
    chunk = max(1, _SCORE_BYTES // max(per_head, 1))
    out = []
    for h0 in range(0, h, chunk):  # head chunks (a constant count per shape, not a loop over blocks or tokens)
        probs = torch.softmax(
            (qp[:, h0 : h0 + chunk].float() @ k_mean[:, h0 : h0 + chunk].float().transpose(-1, -2)) * d**-0.5, -1
        )
        padded = probs.new_zeros(b, probs.shape[1], m * block, m)
        padded[:, :, :n] = probs
        out.append(padded.view(b, -1, m, block, m).sum(3) / counts[:, None])
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------------------ triton
if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from dit_sparse.kernels.block_mass import _qk

    @triton.jit
    def _compressed_scores_fwd(Q, PERM, KM, COUNTS, OUT, sqb, sqh, sqn, skb, skh, skm, N, BLOCK, M, qk_scale,
                               TILE_M: tl.constexpr, TILE_N: tl.constexpr, HEAD_D: tl.constexpr, Q_SUB: tl.constexpr,
                               IEEE: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
        # program pid: sub-tile pid % Q_SUB of query block pid // Q_SUB, written to row pid of OUT [B, H, M * Q_SUB, M]
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        nh = tl.num_programs(1)
        qb = pid // Q_SUB
        in_block = (pid % Q_SUB) * TILE_M + tl.arange(0, TILE_M)
        rows = qb * BLOCK + in_block
        row_ok = (in_block < BLOCK) & (rows < N)
        tok = tl.load(PERM + rows, mask=row_ok, other=0).to(tl.int64)
        offs_n = tl.arange(0, TILE_N)
        offs_d = tl.arange(0, HEAD_D)
        q_base = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = b.to(tl.int64) * skb + h.to(tl.int64) * skh
        q = tl.load(Q + q_base + tok[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        # pass 1: each row's log-sum-exp over the M compressed keys (log2 units), online max and sum
        m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([TILE_M], dtype=tl.float32)
        for j in tl.range(0, tl.cdiv(M, TILE_N)):
            cols = j * TILE_N + offs_n
            ok = cols < M
            qk = _qk(q, KM, k_base, cols, ok, offs_d, skm, True, IEEE, UPCAST)
            qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
            m_i = m_new
        lse2 = tl.where(row_ok, m_i + tl.math.log2(l_i), float("inf"))  # invalid rows: probabilities 0
        # pass 2: the probabilities summed over the block's rows, divided by its token count
        inv_count = 1.0 / tl.load(COUNTS + qb)
        out = OUT + ((b.to(tl.int64) * nh + h) * (M * Q_SUB) + pid) * M
        for j in tl.range(0, tl.cdiv(M, TILE_N)):
            cols = j * TILE_N + offs_n
            ok = cols < M
            qk = _qk(q, KM, k_base, cols, ok, offs_d, skm, True, IEEE, UPCAST)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            tl.store(out + cols, tl.sum(p, 0) * inv_count, mask=ok)


def triton_compressed_scores(
    q: torch.Tensor, k_mean: torch.Tensor, block: int, perm: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """:func:`compressed_scores` with the fused Triton kernel (the ``triton`` backend), one launch (two for query
    blocks above 128 tokens: the kernel, then the sum of the sub-tile rows); head dims up to 256 (padded with zeros to
    a power of two of at least 16: one copy of q when D is not one)."""
    b, h, n, d = q.shape
    if d > _MAX_HEAD_DIM:
        raise ValueError(f"compressed_scores backend='triton' supports head dims up to {_MAX_HEAD_DIM} (got {d})")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    m = counts.numel()
    head_d = max(16, triton.next_power_of_2(d))
    km = k_mean.to(q.dtype)  # [B, H, M, D], small: the dot runs in the inputs' dtype
    if head_d != d:  # zero columns leave every dot product unchanged (the scale stays 1 / sqrt(d))
        q, km = (torch.nn.functional.pad(t, (0, head_d - d)) for t in (q, km))
    q = q if q.stride(-1) == 1 else q.contiguous()
    km = km.contiguous()
    interpret = q.device.type == "cpu"
    upcast = interpret and q.dtype == torch.bfloat16  # the interpreter multiplies bf16 tiles as raw integers
    tile_m = min(max(16, triton.next_power_of_2(block)), 128)
    tile_n = 64 if head_d > 64 else 128
    q_sub = -(-block // tile_m)
    out = torch.empty(b, h, m * q_sub, m, dtype=torch.float32, device=q.device)
    _compressed_scores_fwd[(m * q_sub, h, b)](
        q, perm.contiguous(), km, counts.float().contiguous(), out, q.stride(0), q.stride(1), q.stride(2),
        km.stride(0), km.stride(1), km.stride(2), n, block, m, d**-0.5 * _LOG2E,
        TILE_M=tile_m, TILE_N=tile_n, HEAD_D=head_d, Q_SUB=q_sub, IEEE=q.dtype == torch.float32 or upcast,
        UPCAST=upcast, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out if q_sub == 1 else out.view(b, h, m, q_sub, m).sum(3)


__all__ = ["compressed_scores", "reference_compressed_scores", "triton_compressed_scores"]
