"""Triton backend: block-sparse flash attention (forward) that visits only the key blocks a BlockPlan lists.

One program computes ``BLOCK_M`` query rows of one (batch, head): it walks the plan's key-block list for its query
block with an online softmax (fp32 accumulators, ``exp2`` with the scale folded in) and writes the output once.

Design points (the measurements behind them: ``benchmarks/results/kernels-*.md``):

- **Layout.** q/k/v are ``[B, H, N, D]`` with any strides (Diffusers hands a BHND view of BNHD memory); the output
  is allocated in BNHD memory and returned as the BHND view, so the processor's following permute + flatten is free.
- **Loads.** Without a permutation, q/k/v tiles come through TMA tensor descriptors on Hopper (a 2-D row view of
  the tensor: row = token, ``stride(-2)`` elements per row), else through plain pointer loads. With a permutation,
  q rows are gathered and output rows scattered through ``perm`` in the kernel (free: once per tile). K and V are
  either gathered in the kernel too (pointer loads: Hopper's TMA cannot gather) or, for the TMA configurations,
  gathered once into contiguous copies (one pass over K and V, their size in temporary memory) that TMA then reads;
  the autotuner picks: the copy pays off on long rows (density >~ 0.25), the in-kernel gather on short ones.
- **Tails.** Per plan (in the plan's cache), each key-block list is reordered so that the partial last key block, when
  listed, comes last: the main loop runs unmasked and only that one block is masked. ``kv_len`` (padded keys)
  masks every tile (a separate compiled variant). Query rows past ``N`` are never stored.
- **Head modes.** HEAD_SKIP heads get an empty list (same cache): zero output, LSE ``-inf``. Rows whose every
  key is masked (``kv_len``) give 0 and ``-inf`` too.
- **Autotune.** Block sizes that divide the plan's blocks, warps, stages, TMA on/off: timed once per key
  (head dim, dtype, density octave, size bucket, plan block sizes, permutation, kv_len, TMA-able layout) on the first
  call and kept by the kernel's :class:`~dit_sparse.kernels.tuning.Tuner` :data:`TUNER` (with the tuning log and
  the last configuration used; ``DIT_SPARSE_AUTOTUNE=0`` takes the first candidate instead).
  The density octave needs one device->host read per new plan (cached with the plan; never per call), none when
  the plan carries a host-side ``density_hint`` (dynamic methods, whose plans are new every call).
- **FP8** (``precision="fp8"``, Hopper and newer): the same kernel reads the 8-bit copies and scales the pre-pass of
  :mod:`~dit_sparse.kernels.quant` makes every call (already in the plan's token order: no K/V gather, TMA always
  applies; V transposed, K-major for the fp8 dot); Q·Kᵀ is an INT8 dot with exact int32 sums, a key tile's scores
  are dequantized by one scalar (Q's block scale with the softmax scale folded in, times K's), P goes to fp8 at
  scale 448 and each tile's P·V is added in fp32, the row's sum kept in the units of the current key block's V scale
  (powers of two: the change of unit is exact and rides on the softmax rescale); the last unit is applied to the
  output, the smoothing term of K's sample mean to the LSE. Its own tuning key field.
- **float32 inputs** run with exact (``ieee``) fp32 dot products on a small tile: correct, not fast. Use
  bf16/fp16 for speed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dit_sparse.kernels.backends import FP8_MIN_TILE, AttentionCall
from dit_sparse.kernels.quant import FP8_MAX, ROUND_MAGIC, FP8Inputs, quantize_fp8, to_fp8
from dit_sparse.kernels.tuning import Tuner
from dit_sparse.plan import HEAD_SKIP, BlockPlan

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

_LOG2E = 1.4426950408889634
_MAGIC = tl.constexpr(ROUND_MAGIC)
_MAGIC_BITS = tl.constexpr(0x4B400000)  # ROUND_MAGIC's fp32 bits: int i + these bits, read as fp32, is M + i
_LOG2_FP8_MAX = tl.constexpr(math.log2(FP8_MAX))
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, v_ratio, keep, MASKED: tl.constexpr, IEEE: tl.constexpr,
                  FP8: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax; ``keep`` [BLOCK_M or 1, BLOCK_N] masks columns when MASKED.

    FP8: q, k are int8 and v fp8 (all fp32 in the interpreter), ``qk_scale`` the tile's dequantization scale,
    ``v_ratio`` the previous tile's V scale over this one's (``acc`` is kept in the current tile's V units). The
    int32 scores plus :data:`ROUND_MAGIC`'s bits, read as fp32, are ``M + s`` exactly; ``M · scale`` and P's fp8
    scale 448 (``log2 448``) go into the row's exponent offset, so each score costs one integer add and one FMA
    before its ``exp2`` (the row sums ``l_i`` carry the 448). P goes to fp8 and the tile's P·V is added to ``acc``
    in fp32 (Hopper's fp8 MMA accumulates in reduced precision: only a tile's BLOCK_N products are summed there)."""
    if FP8:
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") + _MAGIC  # exact: integers below 2^22
        else:
            qk = (tl.dot(q, tl.trans(k), out_dtype=tl.int32) + _MAGIC_BITS).to(tl.float32, bitcast=True)
    elif IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(keep, qk, float("-inf"))
    if FP8:
        m_ij = tl.maximum(m_i, (tl.max(qk, 1) - _MAGIC) * qk_scale)
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = m_ij
    if MASKED:
        m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # fully masked rows so far: keep p = 0, not NaN
    if FP8:
        p = tl.math.exp2(qk * qk_scale - (m_use + (_MAGIC * qk_scale - _LOG2_FP8_MAX))[:, None])
    else:
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP8:
        acc = acc * (alpha * v_ratio)[:, None]  # exact: the V scales are powers of two
    else:
        acc = acc * alpha[:, None]
    if FP8:
        p8 = to_fp8(p, IEEE)  # IEEE: the interpreter (exact cast there)
        if IEEE:
            acc += tl.dot(p8.to(tl.float32), v, input_precision="ieee")
        else:
            acc += tl.dot(p8, v)
    elif IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _pow2_ratio(a, b):
    """``a / b`` for powers of two (normal, and so is the quotient): the exponents subtracted, exact."""
    return (a.to(tl.int32, bitcast=True) - b.to(tl.int32, bitcast=True) + 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _load_kv(
    K,
    V,
    desc_k,
    desc_v,
    k_base,
    v_base,
    row0_k,
    col0_k,
    row0_v,
    col0_v,
    PERM,
    start,
    offs_n,
    offs_d,
    N,
    skn,
    svn,
    TAIL: tl.constexpr,
    GATHER: tl.constexpr,
    USE_TMA: tl.constexpr,
    OFF64: tl.constexpr,
    UPCAST: tl.constexpr,
    V_T: tl.constexpr,
):
    """K and V tiles [BLOCK_N, D] of the (permuted) key rows ``start + offs_n``.

    V_T: V is stored transposed (fp8: ``[D, N]`` rows, ``svn`` apart): its [D, BLOCK_N] tile is loaded and
    transposed in registers, which keeps the dot's second operand K-major."""
    rows = start + offs_n
    if V_T:
        k, v = _load_kv_vt(K, V, desc_k, desc_v, k_base, v_base, row0_k, col0_k, row0_v, col0_v, start, offs_n,
                           offs_d, N, skn, svn, TAIL, USE_TMA)  # fmt: skip
    elif USE_TMA:
        k = desc_k.load([row0_k + start, col0_k])
        v = desc_v.load([row0_v + start, col0_v])
    else:
        ok = rows < N
        if GATHER:
            if TAIL:
                rows = tl.load(PERM + rows, mask=ok, other=0)
            else:
                rows = tl.load(PERM + rows)
        if OFF64:
            rows = rows.to(tl.int64)
        if TAIL:
            k = tl.load(K + k_base + rows[:, None] * skn + offs_d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(V + v_base + rows[:, None] * svn + offs_d[None, :], mask=ok[:, None], other=0.0)
        elif GATHER:
            k = tl.load(K + k_base + rows[:, None] * skn + offs_d[None, :])
            v = tl.load(V + v_base + rows[:, None] * svn + offs_d[None, :])
        else:
            # scalar tile base + loop-invariant offsets (cheaper address arithmetic than per-row products)
            s0 = start
            if OFF64:
                s0 = s0.to(tl.int64)
            k = tl.load(K + (k_base + s0 * skn) + (offs_n[:, None] * skn + offs_d[None, :]))
            v = tl.load(V + (v_base + s0 * svn) + (offs_n[:, None] * svn + offs_d[None, :]))
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _load_kv_vt(K, V, desc_k, desc_v, k_base, v_base, row0_k, col0_k, row0_v, col0_v, start, offs_n, offs_d, N,
                skn, svn, TAIL: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """The fp8 path's K tile [BLOCK_N, D] and V tile [BLOCK_N, D] from V^T (contiguous, zero-padded copies)."""
    if USE_TMA:
        k = desc_k.load([row0_k + start, col0_k])
        vt = desc_v.load([row0_v, col0_v + start])
    else:
        rows = (start + offs_n).to(tl.int64)
        ok = rows < N
        if TAIL:
            k = tl.load(K + k_base + rows[:, None] * skn + offs_d[None, :], mask=ok[:, None], other=0.0)
            vt = tl.load(V + v_base + offs_d[:, None] * svn + rows[None, :], mask=ok[None, :], other=0.0)
        else:
            k = tl.load(K + k_base + rows[:, None] * skn + offs_d[None, :])
            vt = tl.load(V + v_base + offs_d[:, None] * svn + rows[None, :])
    return k, tl.trans(vt)


@triton.jit
def _key_keep(PERM, KV_LEN, b, start, offs_n, N, TAIL: tl.constexpr, HAS_PERM: tl.constexpr, HAS_KVLEN: tl.constexpr):
    """[1, BLOCK_N] columns of this tile that are real keys (inside N) and not padding (kv_len)."""
    cols = start + offs_n
    keep = cols < N
    if HAS_KVLEN:
        kvl = tl.load(KV_LEN + b)
        if HAS_PERM:
            orig = tl.load(PERM + cols, mask=keep, other=0)
        else:
            orig = cols
        keep = keep & (orig < kvl)
    return keep[None, :]


@triton.jit
def _block_sparse_fwd(
    Q,
    K,
    V,
    Out,
    LSE,
    desc_q,
    desc_k,
    desc_v,
    KV_NUM,
    KV_IDX,
    PERM,
    KV_LEN,
    Q_SCALE,
    K_SCALE,
    V_SCALE,
    Q_DOT_MEAN,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    snb,
    snh,
    sib,
    sih,
    N,
    MK,
    q_rows_per_row,
    k_rows_per_row,
    v_rows_per_row,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    Q_SUB: tl.constexpr,
    KV_SUB: tl.constexpr,
    PLAN_BKV: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_PERM: tl.constexpr,
    Q_GATHER: tl.constexpr,
    KV_GATHER: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    USE_TMA: tl.constexpr,
    IEEE: tl.constexpr,
    OFF64: tl.constexpr,
    UPCAST: tl.constexpr,
    FP8: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m_plan = pid_m // Q_SUB

    num = tl.load(KV_NUM + b * snb + h * snh + m_plan)
    idx_ptr = KV_IDX + b64 * sib + h64 * sih + m_plan * MK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < N
    if HAS_PERM:
        q_rows = tl.load(PERM + offs_m, mask=row_ok, other=0)
    else:
        q_rows = offs_m
    if OFF64:
        q_rows = q_rows.to(tl.int64)

    q_base = b64 * sqb + h64 * sqh
    k_base = b64 * skb + h64 * skh
    v_base = b64 * svb + h64 * svh
    # TMA row view: the (b, h) slice starts at row base // rows_per_row, column base % rows_per_row
    row0_q = (q_base // q_rows_per_row).to(tl.int32)
    col0_q = (q_base % q_rows_per_row).to(tl.int32)
    row0_k = (k_base // k_rows_per_row).to(tl.int32)
    col0_k = (k_base % k_rows_per_row).to(tl.int32)
    row0_v = (v_base // v_rows_per_row).to(tl.int32)
    col0_v = (v_base % v_rows_per_row).to(tl.int32)

    if USE_TMA and not Q_GATHER:
        q = desc_q.load([row0_q + pid_m * BLOCK_M, col0_q])
    elif Q_GATHER:
        q = tl.load(Q + q_base + q_rows[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(Q + q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    bh = b64 * tl.num_programs(1) + h64
    v_unit = tl.full([], 1.0, dtype=tl.float32)  # fp8: the V scale of the last key tile (acc's unit)
    if FP8:  # the fp8 inputs' scales: Q's per plan query block (softmax scale folded in), K's and V's per key block
        qk_scale = tl.load(Q_SCALE + bh * tl.cdiv(N, BLOCK_M * Q_SUB) + m_plan)
        k_scales = K_SCALE + bh * MK
        v_scales = V_SCALE + bh * MK

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    # the partial last key block, when listed, was moved to the end of the list by the plan preprocessing
    n_blocks = num
    has_tail = num < 0  # False, as a tensor
    if not EVEN_N:
        last = tl.load(idx_ptr + tl.maximum(num - 1, 0))
        has_tail = (num > 0) & (last == MK - 1)
        n_blocks = num - has_tail.to(tl.int32)

    for j in tl.range(0, n_blocks * KV_SUB):
        kb = tl.load(idx_ptr + j // KV_SUB)
        start = kb * PLAN_BKV + (j % KV_SUB) * BLOCK_N
        k, v = _load_kv(K, V, desc_k, desc_v, k_base, v_base, row0_k, col0_k, row0_v, col0_v, PERM, start,
                        offs_n, offs_d, N, skn, svn, False, KV_GATHER, USE_TMA, OFF64, UPCAST, FP8)  # fmt: skip
        keep = offs_n[None, :] >= 0
        if HAS_KVLEN:
            keep = _key_keep(PERM, KV_LEN, b, start, offs_n, N, False, HAS_PERM, HAS_KVLEN)
        tile_scale = qk_scale
        v_ratio = 1.0
        if FP8:
            tile_scale = qk_scale * tl.load(k_scales + kb)
            v_tile = tl.load(v_scales + kb)
            v_ratio = _pow2_ratio(v_unit, v_tile)
            v_unit = v_tile
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, tile_scale, v_ratio, keep, HAS_KVLEN, IEEE, FP8)

    if not EVEN_N:
        if has_tail:
            tail0 = (MK - 1) * PLAN_BKV
            for t in tl.range(0, tl.cdiv(N - tail0, BLOCK_N), num_stages=1):
                start = tail0 + t * BLOCK_N
                k, v = _load_kv(K, V, desc_k, desc_v, k_base, v_base, row0_k, col0_k, row0_v, col0_v, PERM, start,
                                offs_n, offs_d, N, skn, svn, True, KV_GATHER, False, OFF64, UPCAST, FP8)  # fmt: skip
                keep = _key_keep(PERM, KV_LEN, b, start, offs_n, N, True, HAS_PERM, HAS_KVLEN)
                tile_scale = qk_scale
                v_ratio = 1.0
                if FP8:
                    tile_scale = qk_scale * tl.load(k_scales + MK - 1)
                    v_tile = tl.load(v_scales + MK - 1)
                    v_ratio = _pow2_ratio(v_unit, v_tile)
                    v_unit = v_tile
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, tile_scale, v_ratio, keep, True, IEEE, FP8)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if FP8:  # acc's V unit (P's 448 is in l_i)
        out = out * v_unit
    o_ptrs = Out + b64 * sob + h64 * soh + q_rows[:, None] * son + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        lse = m_i + tl.math.log2(l_safe)
        if FP8:
            lse -= _LOG2_FP8_MAX
        lse *= 0.6931471805599453
        if FP8:  # K's smoothing moved every score of a row by softmax scale · q·mean(K): the LSE gets it back
            lse += tl.load(Q_DOT_MEAN + bh * (tl.cdiv(N, BLOCK_M * Q_SUB) * BLOCK_M * Q_SUB) + offs_m)
        lse = tl.where(empty, float("-inf"), lse)
        lse_ptrs = LSE + (b64 * tl.num_programs(1) + h64) * N + q_rows
        tl.store(lse_ptrs, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------- plan handling
@dataclass(frozen=True)
class _Prepared:
    """Plan data in the kernel's form (built once per plan and head count, kept in the plan's cache)."""

    kv_num: torch.Tensor  # int32 [B', H'', Mq], HEAD_SKIP heads zeroed
    kv_idx: torch.Tensor  # int32 [B', H'', Mq, Mk] contiguous, partial last block moved to the end of each list
    perm: torch.Tensor | None  # int32 [N]


def _prepare(plan: BlockPlan, heads: int) -> _Prepared:
    return plan.derived(("triton", heads), lambda: _build_prepared(plan, heads))


def _build_prepared(plan: BlockPlan, heads: int) -> _Prepared:
    kv_num, kv_idx = plan.kv_num_blocks, plan.kv_indices
    if plan.head_mode is not None and HEAD_SKIP in plan.head_mode:
        skip = torch.tensor([m == HEAD_SKIP for m in plan.head_mode], device=kv_num.device)
        kv_num = kv_num.expand(kv_num.shape[0], heads, kv_num.shape[2]) * (~skip).view(1, -1, 1).to(kv_num.dtype)
        kv_idx = kv_idx.expand(kv_idx.shape[0], heads, *kv_idx.shape[2:])
    kv_num = kv_num.to(torch.int32).contiguous()
    kv_idx = kv_idx.to(torch.int32).contiguous()
    mk = plan.num_kv_blocks
    if plan.seq_len % plan.block_kv:
        # move the partial last key block to the end of each list (swap it with the last listed entry)
        valid = torch.arange(mk, device=kv_idx.device) < kv_num.unsqueeze(-1)
        is_tail = (kv_idx == mk - 1) & valid
        has = is_tail.any(-1, keepdim=True)
        tpos = is_tail.to(torch.uint8).argmax(-1, keepdim=True)
        lpos = (kv_num.unsqueeze(-1).long() - 1).clamp_min(0)
        last_val = kv_idx.gather(-1, lpos)
        swapped = kv_idx.scatter(-1, tpos, last_val).scatter(-1, lpos, torch.full_like(last_val, mk - 1))
        kv_idx = torch.where(has, swapped, kv_idx).contiguous()
    perm = None if plan.perm is None else plan.perm.to(torch.int32).contiguous()
    return _Prepared(kv_num, kv_idx, perm)


def _density_octave(plan: BlockPlan, heads: int, prep: _Prepared) -> int:
    """The octave of the fraction of key blocks listed: 0 (dense, > 0.71), 1 (~1/2), ... 5 (~1/32 and sparser). Short
    rows want shallower pipelines (3 stages beat 4 by 10-20% at 0.05 on the H100, not at 0.25). From the plan's
    host-side ``density_hint`` when it has one (dynamic plans, rebuilt every call: no sync), else one host read per
    plan, then kept in the plan's cache."""
    d = plan.density_hint
    if d is None:
        d = plan.derived(("triton", heads, "density"), lambda: float(prep.kv_num.float().mean()) / plan.num_kv_blocks)
    return min(5, max(0, round(-math.log2(max(d, 1e-6)))))


# ------------------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration (BLOCK_M must divide the plan's block_q, BLOCK_N its block_kv)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # K/V tiles through TMA; a permuted plan then gathers K and V once into copies first

    def __str__(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}{'-tma' if self.tma else ''}"


def candidate_configs(head_dim: int, dtype: torch.dtype, precision: str = "bf16") -> list[KernelConfig]:
    """Configurations the autotuner tries (before fitting them to the plan's block sizes).

    64-row query tiles (one warpgroup) lead for fp8 and for D64: their registers leave room for more resident
    programs per SM, which hides the softmax behind the other programs' MMAs; fp8 at 128 rows and 4 warps spills (its
    P·V tile has its own accumulator). With them fp8 at H12·N32760·D128 went from 1.02x to 1.32x the bf16 kernel at
    density 1 (675 effective TFLOP/s, pre-pass included, H100: ``benchmarks/results/kernels-2026-12-05-m64.md``),
    and bf16 at D64 (H48·N17550) from 399 to 435. With per-block V scales and the one-launch pre-pass the same
    candidates won every fp8 row of ``kernels-2026-12-05-split.md``."""
    if dtype == torch.float32:
        return [KernelConfig(64, 32, 4, 2)]
    if _INTERPRET:
        return [KernelConfig(32, 32, 4, 1)]
    if precision == "fp8":
        base = [
            KernelConfig(64, 128, 4, 3),
            KernelConfig(64, 128, 4, 2),
            KernelConfig(64, 64, 4, 3),
            KernelConfig(128, 128, 8 if head_dim > 64 else 4, 3),
        ]
    elif head_dim <= 64:
        base = [
            KernelConfig(64, 128, 4, 3),
            KernelConfig(128, 128, 8, 3),
            KernelConfig(128, 64, 4, 3),
            KernelConfig(128, 128, 4, 3),
            KernelConfig(128, 64, 4, 4),
            KernelConfig(64, 64, 4, 3),
        ]
    else:
        base = [
            KernelConfig(128, 64, 4, 3),
            KernelConfig(128, 64, 4, 4),
            KernelConfig(128, 64, 4, 2),
            KernelConfig(128, 128, 8, 3),
        ]
    tma = [dataclasses.replace(c, tma=True) for c in base]
    default = base + tma
    forced = os.environ.get("DIT_SPARSE_TRITON_CONFIGS")  # e.g. "m128n128w8s3-tma,m128n64w4s3"
    if forced:
        names = set(forced.split(","))
        picked = [c for c in default if str(c) in names]
        if len(picked) != len(names):
            raise ValueError(
                f"DIT_SPARSE_TRITON_CONFIGS={forced!r} names unknown configs; choose among {[str(c) for c in default]}"
            )
        return picked
    return default


def _largest_pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _fit(cfg: KernelConfig, block_q: int, block_kv: int, min_n: int = 16) -> KernelConfig | None:
    """The config with tiles shrunk to divide the plan's blocks (None when a tile would drop under 16, or BLOCK_N
    under ``min_n``: the fp8 P·V dot needs 32)."""
    bm = _largest_pow2_divisor(block_q, cfg.block_m)
    bn = _largest_pow2_divisor(block_kv, cfg.block_n)
    if bm < 16 or bn < min_n:
        return None
    return dataclasses.replace(cfg, block_m=bm, block_n=bn)


@functools.cache
def _has_tma(device_index: int) -> bool:
    return TensorDescriptor is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_row_view(t: torch.Tensor) -> int | None:
    """Row width (elements) of ``t`` seen as 2-D rows of tokens, when TMA can load its tiles; else None."""
    if _INTERPRET or not t.is_cuda or t.data_ptr() % 16:
        return None
    width = _tma_layout_width(tuple(t.shape), tuple(t.stride()), t.element_size(), t.device.index or 0)
    if (
        width is None
        or t.storage_offset() + _tma_rows(t, width) * width > t.untyped_storage().nbytes() // t.element_size()
    ):
        return None
    return width


@functools.lru_cache(maxsize=256)
def _tma_layout_width(shape: tuple, stride: tuple, es: int, device_index: int) -> int | None:
    """The layout part of the TMA check (cached: it loops over batch x heads)."""
    if not _has_tma(device_index):
        return None
    b, h, n, d = shape
    sb, sh, sn, sd = stride
    if sd != 1 or sn < d or (sn * es) % 16 or (d * es) < 16:
        return None
    for bi in range(b):
        for hi in range(h):
            off = bi * sb + hi * sh
            if off < 0 or (off % sn) + d > sn:
                return None
    return sn


def _tma_rows(t: torch.Tensor, row_width: int) -> int:
    """Rows of the 2-D row view that cover every element of ``t``."""
    b, h, n, d = t.shape
    sb, sh, sn, _ = t.stride()
    span = (b - 1) * sb + (h - 1) * sh + (n - 1) * sn + d
    return -(-span // row_width)


def _make_desc(t: torch.Tensor, row_width: int, rows: int, d: int) -> TensorDescriptor:
    """2-D TMA descriptor over the storage of ``t``: ``[span / row_width, row_width]`` with tiles ``[rows, d]``."""
    b, h, n, _ = t.shape
    sb, sh, sn, _ = t.stride()
    total_rows = _tma_rows(t, row_width)
    base = t.as_strided((total_rows, row_width), (row_width, 1))
    return TensorDescriptor(base, [total_rows, row_width], [row_width, 1], [rows, d])


def _gather_tokens(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t[:, :, perm]`` as a new tensor, gathered along the token axis in t's memory order: a BNHD layout copies whole
    token rows (H·D elements) at a time."""
    if t.stride(2) >= t.stride(1):
        return t.transpose(1, 2).index_select(1, perm).transpose(1, 2)
    return t.index_select(2, perm)


# ------------------------------------------------------------------------------------------------------- launch
def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    prep: _Prepared,
    scale: float,
    out_mem: torch.Tensor,
    lse: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    cfg: KernelConfig,
    fp8: FP8Inputs | None = None,
) -> None:
    """One kernel launch; with ``fp8`` the kernel reads its tensors and scales instead of q, k, v (already in the
    plan's token order: nothing is gathered but the output rows)."""
    b, n, h, d = out_mem.shape
    has_perm = prep.perm is not None
    if fp8 is not None:
        q, k, v = fp8.q, fp8.k, fp8.vt
    elif has_perm and cfg.tma:  # gather K and V once (contiguous copies) so that their tiles can come through TMA
        k, v = _gather_tokens(k, prep.perm), _gather_tokens(v, prep.perm)
    q_gather = has_perm and fp8 is None
    widths = [_tma_row_view(t) for t in (q, k, v)] if cfg.tma else [None] * 3
    use_tma = cfg.tma and None not in widths[1:] and (q_gather or widths[0] is not None)
    if use_tma:
        desc_q = None if q_gather else _make_desc(q, widths[0], cfg.block_m, d)
        desc_k = _make_desc(k, widths[1], cfg.block_n, d)
        desc_v = _make_desc(v, widths[2], cfg.block_n, d) if fp8 is None else _make_desc(v, widths[2], d, cfg.block_n)
        widths = [w or 1 for w in widths]
    else:
        desc_q = desc_k = desc_v = None
        widths = [1, 1, 1]
    out = out_mem.permute(0, 2, 1, 3)
    kv_num, kv_idx = prep.kv_num, prep.kv_idx
    snb = 0 if kv_num.shape[0] == 1 else kv_num.stride(0)
    snh = 0 if kv_num.shape[1] == 1 else kv_num.stride(1)
    sib = 0 if kv_idx.shape[0] == 1 else kv_idx.stride(0)
    sih = 0 if kv_idx.shape[1] == 1 else kv_idx.stride(1)
    rows = (q, k, out) if fp8 is not None else (q, k, v, out)  # V^T's tile offsets stay below its (b, h) slice
    max_off = max((n + cfg.block_m) * max(abs(x.stride(2)) for x in rows) + d, b * h * n, v.stride(1))
    off64 = max_off >= 2**31
    # Triton's interpreter (3.9) multiplies bf16 (and int8, fp8) tiles as raw integers: upcast to fp32 there (tests only)
    upcast = _INTERPRET and q.dtype in (torch.bfloat16, torch.int8)
    grid = (triton.cdiv(n, cfg.block_m), h, b)
    dummy = kv_num
    _block_sparse_fwd[grid](
        q,
        k,
        v,
        out,
        lse if lse is not None else dummy,
        desc_q,
        desc_k,
        desc_v,
        kv_num,
        kv_idx,
        prep.perm if prep.perm is not None else dummy,
        kv_len if kv_len is not None else dummy,
        *((fp8.q_scale, fp8.k_scale, fp8.v_scale) if fp8 is not None else (dummy,) * 3),
        fp8.q_dot_mean if fp8 is not None and fp8.q_dot_mean is not None else dummy,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        snb,
        snh,
        sib,
        sih,
        n,
        plan.num_kv_blocks,
        widths[0],
        widths[1],
        widths[2],
        scale * _LOG2E,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        HEAD_D=d,
        Q_SUB=plan.block_q // cfg.block_m,
        KV_SUB=plan.block_kv // cfg.block_n,
        PLAN_BKV=plan.block_kv,
        EVEN_N=(n % plan.block_kv == 0),
        HAS_PERM=has_perm,
        Q_GATHER=q_gather,
        KV_GATHER=q_gather and not cfg.tma,
        HAS_KVLEN=kv_len is not None,
        RETURN_LSE=lse is not None,
        USE_TMA=use_tma,
        IEEE=(q.dtype == torch.float32) or upcast,
        OFF64=off64,
        UPCAST=upcast,
        FP8=fp8 is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


TUNER: Tuner[KernelConfig] = Tuner("triton block-sparse attention", persist=True)
"""The autotune results of this kernel (best configuration per :class:`TuneKey`, log, last configuration)."""


class TuneKey(NamedTuple):
    """What a tuned configuration is valid for (a config tuned on a tiny problem must not serve a large one)."""

    head_dim: int
    dtype: str
    density_octave: int  # see _density_octave
    size_bucket: int  # factor 4 in B*H*N
    block_q: int
    block_kv: int
    perm: bool
    kv_len: bool
    tma_layout: bool  # q, k and v all TMA-able (the fp8 path's own copies always are)
    precision: str = "bf16"


@functools.lru_cache(maxsize=64)
def _fitted(
    d: int, dtype: torch.dtype, block_q: int, block_kv: int, precision: str = "bf16"
) -> tuple[KernelConfig, ...]:
    fitted: list[KernelConfig] = []
    for c in candidate_configs(d, dtype, precision):
        f = _fit(c, block_q, block_kv, min_n=FP8_MIN_TILE if precision == "fp8" else 16)
        if f is not None and f not in fitted:
            fitted.append(f)
    return tuple(fitted)


def _pick_config(q, k, v, plan, prep, scale, out_mem, lse, kv_len, fp8: FP8Inputs | None = None) -> KernelConfig:
    b, h, n, d = q.shape
    precision = "bf16" if fp8 is None else "fp8"
    fitted = _fitted(d, q.dtype, plan.block_q, plan.block_kv, precision)  # not empty: the declaration checks blocks
    if len(fitted) == 1 or not q.is_cuda or os.environ.get("DIT_SPARSE_AUTOTUNE", "1") == "0":
        return fitted[0]
    tensors = (q, k, v) if fp8 is None else (fp8.q, fp8.k, fp8.vt)
    key = TuneKey(
        d,
        str(q.dtype),
        _density_octave(plan, h, prep),
        (b * h * n).bit_length() // 2,
        plan.block_q,
        plan.block_kv,
        plan.perm is not None,
        kv_len is not None,
        all(_tma_row_view(t) is not None for t in tensors),
        precision,
    )

    def time_ms(cfg: KernelConfig) -> float:
        run = lambda: _launch(q, k, v, plan, prep, scale, out_mem, lse, kv_len, cfg, fp8)  # noqa: E731
        return triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")

    return TUNER.pick(key, fitted, time_ms, shape=[b, h, n, d])


def triton_block_attention(
    call: AttentionCall, config: KernelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention with the Triton kernel (the ``triton`` backend of ``block_sparse_attention``).

    The contract of :class:`AttentionCall`, for calls the ``triton`` declaration accepts (head dims, equal q and v
    head dims, blocks multiples of 16, for fp8 head dims and blocks >= 32 on sm90+: ``block_sparse_attention``
    checks them); the output is a BHND view of BNHD memory. ``precision="fp8"`` quantizes q, k, v first
    (:func:`~dit_sparse.kernels.quant.quantize_fp8`, every call). ``config`` pins a launch configuration (tests,
    benchmarks); by default one is autotuned by :data:`TUNER`.
    """
    q, k, v, plan, scale, kv_len = call.q, call.k, call.v, call.plan, call.scale, call.kv_len
    b, h, n, d = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if kv_len is not None:
        kv_len = kv_len.to(device=q.device, dtype=torch.int32)
    prep = _prepare(plan, h)
    out_mem = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device) if call.return_lse else None
    fp8 = quantize_fp8(q, k, v, plan, prep.perm, scale, call.return_lse) if call.precision == "fp8" else None
    if config is None:
        cfg = _pick_config(q, k, v, plan, prep, scale, out_mem, lse, kv_len, fp8)
    else:
        cfg = _fit(config, plan.block_q, plan.block_kv, min_n=16 if fp8 is None else FP8_MIN_TILE)
        if cfg is None:
            raise ValueError(f"config {config} does not fit the plan's blocks ({plan.block_q}, {plan.block_kv})")
    _launch(q, k, v, plan, prep, scale, out_mem, lse, kv_len, TUNER.used(cfg), fp8)
    return out_mem.permute(0, 2, 1, 3), lse


__all__ = ["TUNER", "KernelConfig", "TuneKey", "candidate_configs", "triton_block_attention"]
