"""Block attention mass: the softmax mass ``sum exp(scale · q·k − lse_row)`` of every (query block, key block) pair.

AdaSpa's search (Xia et al. 2025, arXiv 2502.21079, "Fused LSE-Cached Online Search") ranks key blocks by this exact
mass. Entry point :func:`block_mass`, two backends:

- ``triton``: one fused pass. A program owns a tile of query rows (one or several whole blocks), streams every key
  tile through ``q·kᵀ`` on the tensor cores and reduces ``exp2(scale·log2e · q·k − lse·log2e)`` to one float per
  (query block, key block): the ``N × N`` scores never reach memory. There is no ``P·V``, but as many exponentials
  as in attention: on the H100 the pass takes 0.7x a dense SDPA call with a given LSE. Without one, a first sweep
  over the keys computes it (online max and sum, as flash attention does): about 1.7x. The launch configuration is
  timed on the first call per shape class and kept by the kernel's tuner, :data:`TUNER`.
- ``reference``: plain torch, chunked over query rows (one chunk of scores materialised at a time): the oracle for
  tests and the CPU path.

Both compute ``q·kᵀ`` from the inputs' dtype with float32 accumulation and the softmax terms in float32. Exponents
are capped at ``_EXP_CAP`` (a cached LSE from an earlier step can only be slightly stale; the cap keeps a badly stale
one from overflowing float32). Key padding (HunyuanVideo's padded text keys) is not masked: it only adds mass to
text columns, which the methods keep anyway.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from dit_sparse.kernels.api import check_backend, check_qkv
from dit_sparse.kernels.tuning import Tuner
from dit_sparse.plan import num_blocks

# reference: score-matrix elements per chunk of query rows (fp32: 1 GiB), bounds the temporaries
_MASS_CHUNK_ELEMENTS = 1 << 28
# exponent cap (natural log units), see the module docstring
_EXP_CAP = 30.0
_LOG2E = 1.4426950408889634


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int,
    lse: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax mass of every (query block, key block) pair of blocks of ``block`` consecutive tokens.

    Args:
        q, k: ``[B, H, N, D]`` (any strides), float16 / bfloat16 / float32.
        block: block size in tokens (the last block of a sequence not a multiple of it is partial).
        lse: float32 ``[B, H, N]`` row log-sum-exp to normalise by (e.g. cached from an earlier dense pass); default
            None: each row's exact LSE is computed here.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``auto`` (``triton`` on CUDA when Triton is installed, else ``reference``), ``triton`` or
            ``reference`` (``flex`` means ``reference``: FlexAttention has no mass reduction).

    Returns:
        ``mass`` (float32 ``[B, H, Mq, Mk]``, ``M = ceil(N / block)``; a row's masses sum to its token count when
        its LSE is exact) and the LSE used (``lse`` itself when given).
    """
    check_qkv(q, k, k)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if lse is not None and (lse.shape != q.shape[:-1] or lse.dtype != torch.float32):
        raise ValueError(f"lse must be float32 of shape {tuple(q.shape[:-1])}, got {lse.dtype} {tuple(lse.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = check_backend(backend, q.device)
    if name == "triton":
        return triton_block_mass(q, k, block, lse, scale)
    return reference_block_mass(q, k, block, lse, scale)


def reference_block_mass(
    q: torch.Tensor, k: torch.Tensor, block: int, lse: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_mass` in plain torch, chunked over query rows (the ``reference`` backend)."""
    b, h, n, d = q.shape
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


# ------------------------------------------------------------------------------------------------------ triton
if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _qk(q, K, k_base, cols, ok, offs_d, skn, MASKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """``q·kᵀ`` [TILE_M, TILE_N] against the key rows ``cols`` (rows where not ``ok`` load as 0 when MASKED)."""
        k_ptrs = K + (k_base + cols.to(tl.int64)[:, None] * skn) + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            return tl.dot(q, tl.trans(k), input_precision="ieee")
        return tl.dot(q, tl.trans(k))

    @triton.jit
    def _mass_tile(q, K, k_base, kb, t, offs_n, offs_d, N, skn, lse2, qk_scale, cap2, BLOCK, TILE_M: tl.constexpr,
                   TILE_N: tl.constexpr, G: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr):  # fmt: skip
        """``[G]``: per query block of the tile, the sum of ``exp2(qk_scale · q·k − lse2)`` over one key tile (the
        ``t``-th sub-tile of key block ``kb``)."""
        cols = kb * BLOCK + t * TILE_N + offs_n
        ok = (cols < N) & (t * TILE_N + offs_n < BLOCK)
        qk = _qk(q, K, k_base, cols, ok, offs_d, skn, MASKED, IEEE, UPCAST)
        z = tl.minimum(qk * qk_scale - lse2[:, None], cap2)
        if MASKED:
            z = tl.where(ok[None, :], z, float("-inf"))
        rows = tl.sum(tl.math.exp2(z), 1)  # [TILE_M]
        return tl.sum(tl.reshape(rows, (G, TILE_M // G)), 1)

    @triton.jit
    def _block_mass_fwd(Q, K, LSE, MASS, sqb, sqh, sqn, skb, skh, skn, N, BLOCK, MK, PART_ROWS, qk_scale, cap2,
                        TILE_M: tl.constexpr, TILE_N: tl.constexpr, HEAD_D: tl.constexpr, G: tl.constexpr,
                        Q_SUB: tl.constexpr, KV_SUB: tl.constexpr, EVEN_KEYS: tl.constexpr, HAS_LSE: tl.constexpr,
                        IEEE: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
        # program pid: query blocks pid*G .. pid*G+G-1 (G > 1: TILE_M = G * BLOCK), or with G = 1 sub-tile
        # pid % Q_SUB of query block pid // Q_SUB; its masses go to rows pid*G .. of the partial-mass buffer
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        nh = tl.num_programs(1)
        sub = pid % Q_SUB
        in_block = sub * TILE_M + tl.arange(0, TILE_M)
        rows = (pid // Q_SUB) * G * BLOCK + in_block
        row_ok = rows < N
        if G == 1:
            row_ok = row_ok & (in_block < BLOCK)
        offs_n = tl.arange(0, TILE_N)
        offs_d = tl.arange(0, HEAD_D)
        q_base = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = b.to(tl.int64) * skb + h.to(tl.int64) * skh
        q = tl.load(Q + q_base + rows.to(tl.int64)[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse_ptrs = LSE + (b.to(tl.int64) * nh + h) * N + rows
        if HAS_LSE:
            lse2 = tl.load(lse_ptrs, mask=row_ok, other=float("inf")) * 1.4426950408889634
        else:  # first sweep: each row's LSE (log2 units) by online max and sum over every key
            m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([TILE_M], dtype=tl.float32)
            for j in tl.range(0, tl.cdiv(N, TILE_N)):
                cols = j * TILE_N + offs_n
                ok = cols < N
                qk = _qk(q, K, k_base, cols, ok, offs_d, skn, True, IEEE, UPCAST)
                qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
                m_i = m_new
            lse2 = tl.where(row_ok, m_i + tl.math.log2(l_i), float("inf"))
            tl.store(lse_ptrs, lse2 * 0.6931471805599453, mask=row_ok)
        part_rows = pid * G + tl.arange(0, G)
        out = MASS + ((b.to(tl.int64) * nh + h) * PART_ROWS + part_rows) * MK
        out_ok = part_rows < PART_ROWS
        # key blocks that need no column mask: every whole block when tiles divide the block, else none
        full = N // BLOCK if EVEN_KEYS else 0
        for kb in tl.range(0, full):
            acc = tl.zeros([G], dtype=tl.float32)
            for t in tl.static_range(KV_SUB):
                acc += _mass_tile(q, K, k_base, kb, t, offs_n, offs_d, N, skn, lse2, qk_scale, cap2, BLOCK, TILE_M,
                                  TILE_N, G, False, IEEE, UPCAST)  # fmt: skip
            tl.store(out + kb, acc, mask=out_ok)
        for kb in tl.range(full, MK):
            acc = tl.zeros([G], dtype=tl.float32)
            for t in tl.static_range(KV_SUB):
                acc += _mass_tile(q, K, k_base, kb, t, offs_n, offs_d, N, skn, lse2, qk_scale, cap2, BLOCK, TILE_M,
                                  TILE_N, G, True, IEEE, UPCAST)  # fmt: skip
            tl.store(out + kb, acc, mask=out_ok)


@dataclass(frozen=True)
class MassConfig:
    """One launch configuration: ``group`` query blocks per program (> 1 only for power-of-two blocks with
    ``group * block <= 128``), warps, pipeline stages."""

    group: int
    num_warps: int
    num_stages: int


def candidate_configs(block: int, interpret: bool) -> list[MassConfig]:
    """Configurations the first call per key times (the interpreter takes the first).

    128-row tiles win on the H100 (``benchmarks/results/block-mass-sweep-2026-11-23-h100.log``, 64-token blocks:
    two blocks per program with 8 warps and 2 stages, 14% faster than one per program); the list keeps the best two
    of that sweep and the one-block-per-program fallback, so a first call compiles at most three variants."""
    if interpret:
        return [MassConfig(1, 4, 1)]
    if block <= 64 and block & (block - 1) == 0:  # power of two: group query blocks into 128-row tiles
        return [MassConfig(128 // block, 8, 2), MassConfig(128 // block, 4, 3), MassConfig(1, 4, 3)]
    if max(16, triton.next_power_of_2(block)) >= 128:
        return [MassConfig(1, 8, 2), MassConfig(1, 4, 3)]
    return [MassConfig(1, 4, 3)]


def _launch(q, k, block, lse, lse_out, scale, cfg: MassConfig) -> torch.Tensor:
    b, h, n, d = q.shape
    if cfg.group > 1 and (block < 16 or block & (block - 1) or cfg.group * block > 128):
        raise ValueError(f"{cfg} needs a power-of-two block of at least 16 and group * block <= 128 (block {block})")
    p2 = max(16, triton.next_power_of_2(block))
    tile_m = cfg.group * block if cfg.group > 1 else min(p2, 128)
    tile_n = min(p2, 64 if d > 64 else 128)
    q_sub, kv_sub = -(-block // tile_m), -(-block // tile_n)
    m = num_blocks(n, block)
    part = torch.empty(b, h, m * q_sub, m, dtype=torch.float32, device=q.device)
    interpret = q.device.type == "cpu"
    upcast = interpret and q.dtype == torch.bfloat16  # the interpreter multiplies bf16 tiles as raw integers
    grid = (triton.cdiv(m * q_sub, cfg.group), h, b)
    _block_mass_fwd[grid](
        q, k, lse_out, part, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n, block, m, m * q_sub, scale * _LOG2E, _EXP_CAP * _LOG2E,
        TILE_M=tile_m, TILE_N=tile_n, HEAD_D=d, G=cfg.group, Q_SUB=q_sub, KV_SUB=kv_sub,
        EVEN_KEYS=block % tile_n == 0, HAS_LSE=lse is not None, IEEE=q.dtype == torch.float32 or upcast,
        UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return part if q_sub == 1 else part.view(b, h, m, q_sub, m).sum(3)


TUNER: Tuner[MassConfig] = Tuner("triton block mass", persist=True)
"""The autotune results of the block-mass kernel, keyed by (head dim, dtype, block, LSE computed, size bucket)."""


def triton_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int,
    lse: torch.Tensor | None,
    scale: float,
    config: MassConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_mass` with the fused Triton kernel (the ``triton`` backend). ``config`` pins a launch
    configuration (tests, benchmarks); by default the candidates are timed on the first call per (head dim, dtype,
    block, LSE computed, size bucket) and :data:`TUNER` keeps the fastest."""
    b, h, n, d = q.shape
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"block_mass backend='triton' supports head dims 16, 32, 64, 128, 256 (got {d})")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    lse_out = torch.empty(b, h, n, dtype=torch.float32, device=q.device) if lse is None else lse.contiguous()
    if config is None:
        cands = candidate_configs(block, q.device.type == "cpu")
        if len(cands) == 1 or os.environ.get("DIT_SPARSE_AUTOTUNE", "1") == "0":
            config = cands[0]
        else:
            key = (d, str(q.dtype), block, lse is None, (b * h * n).bit_length() // 2)
            config = TUNER.pick(key, cands, lambda c: triton.testing.do_bench(
                lambda: _launch(q, k, block, lse, lse_out, scale, c), warmup=2, rep=10), shape=[b, h, n, d])  # fmt: skip
    return _launch(q, k, block, lse, lse_out, scale, TUNER.used(config)), lse_out if lse is None else lse


__all__ = ["TUNER", "MassConfig", "block_mass", "candidate_configs", "reference_block_mass", "triton_block_mass"]
