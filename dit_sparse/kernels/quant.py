"""FP8 attention (``precision="fp8"``): SageAttention2-style quantization of q, k, v, and its torch emulation.

INT8 Q·Kᵀ and FP8 P·V, as SageAttention2 does (Zhang et al. 2024, §3): with Q·Kᵀ in FP8 e4m3 (3 mantissa bits) the
attention outputs of the embedded model were 2.4% off fp32 (relative L2), with INT8 0.8%
(``benchmarks/results/fp8-accuracy-2026-12-04-int8.md``); both run on the same 8-bit tensor cores. The quantization (the Triton pre-pass :func:`quantize_fp8`, mirrored op for op by
:func:`quantize_fp8_reference`):

- **Token order, padding.** Quantized tensors are written in the plan's token order (permuted when the plan has a
  permutation: the attention kernel then reads them without a gather, through TMA where it can) and padded with
  zeros to whole plan blocks.
- **K smoothing.** ``k - k_mean`` with ``k_mean`` the mean of a sample of :data:`SMOOTH_SAMPLES` keys per (b, h,
  channel), at positions ``i·s mod N`` (original token order; ``s``: the integer nearest ``N·0.618`` that is coprime
  with N, :func:`smoothing_rows`). Any vector shared by every key of a head is exact for the softmax (every score of a
  row moves by the same ``q·k_mean``); the sample removes a channel's offset as well as the full mean does (the
  offset is common to all tokens; the sample's error is the spread over 8) and costs no pass over K before the casts.
  The golden-ratio stride visits every column and row of a latent grid whose sizes divide N: an even stride
  ``N // 64`` hit one column of the embedded model's 16x16 frames, where RoPE'd keys share a phase, and raised its
  error from 0.79% to 0.85% (full mean 0.79%). The LSE, when asked for, gets the term back (``q_dot_mean``).
- **Q, K:** INT8 (round to nearest even, ±127) with one scale per (b, h, plan block): ``absmax / 127``; Q's scale
  carries the softmax scale and ``log2(e)`` (the kernel's ``exp2`` domain), so a key tile's score scale is one
  product ``q_scale · k_scale``. The int32 dot products are exact (``|q·k| <= 127²·D < 2²²`` for D <= 256).
- **V:** FP8 e4m3 with one power-of-two scale per (b, h, plan key block): the smallest ``2^e`` with
  ``absmax <= 448·2^e`` (absmax floored at :data:`V_SCALE_FLOOR`). FP8's precision is relative (3 mantissa bits at
  every magnitude), so a block scale keeps small channels as exact as a channel scale would. The kernel keeps a row's
  P·V sum in the units of the current key block's scale (an exact power-of-two rescale, folded into the softmax's
  per-row rescale) and applies the last one to the output. Stored transposed, ``[B, H, D, N]``: an fp8 tensor-core
  dot (Hopper wgmma) takes its second operand K-major only.
- **P** (the softmax numerators, in [0, 1]): FP8 e4m3 with the fixed scale 448; P·V accumulates in fp32 per key
  tile (Hopper's fp8 MMA accumulates in reduced precision), the row sums and the LSE in fp32.

Every statistic is local to a block (the K sample is read from L2 by every program that needs it), so the pre-pass is
one Triton launch that reads q, k and v once from memory and writes their 8-bit copies, one program per Q, K or V plan
block: gather, mean subtraction, absmax, scale, cast, transposed store. On an H100 at H12·N32760·D128 it takes 0.20 ms
(2.2 TB/s), against 0.34 ms for the earlier two launches with whole-sequence statistics
(``benchmarks/results/kernels-2026-12-05-split.md``).

The emulation (``backend="reference", precision="fp8"``: CPU tests and accuracy studies) quantizes with the same
formulas in the same order (the Q and V scales and the quantized tensors match the kernel's bit for bit; K's sample
mean may differ in its last bit, the order of a float sum) and then runs the attention in one pass per row where the kernel's
online softmax quantizes P against a running maximum: the two agree closely, not bitwise.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_sparse.kernels.backends import AttentionCall, mask_skipped_heads
from dit_sparse.plan import BlockPlan

try:  # the emulation needs no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

FP8_MAX = 448.0
"""The largest finite float8 e4m3 value: V's absmax maps to it, and P in [0, 1] is scaled by it."""
FP8_DTYPE = torch.float8_e4m3fn
INT8_MAX = 127.0
"""Q's and K's absmax maps to it."""
ROUND_MAGIC = 12582912.0
"""1.5 · 2²³: ``(x + M) - M`` rounds an fp32 ``|x| < 2²²`` to the nearest integer, ties to even, on every device."""
SCALE_FLOOR = 1e-30
"""Absmax floor: an all-zero block gets finite scales (and zeros)."""
V_SCALE_FLOOR = 2.0**-40
"""V's absmax floor. The kernel's P·V sum moves between key blocks' scales; a floor this high keeps the ratio of
two scales (and so the sum) far inside fp32 even next to an all-zero block."""
SMOOTH_SAMPLES = 64
"""Keys in K's smoothing sample (see :func:`smoothing_rows`)."""
MAX_ROWS = 128
"""Most rows the pre-pass loads at once."""
_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LN2 = 0.6931471805599453


@dataclass(frozen=True)
class FP8Inputs:
    """q, k, v quantized for the fp8 kernel, in the plan's token order, padded to whole plan blocks.

    ``Nq = Mq·block_q``, ``Nk = Mk·block_kv``; rows past N are zeros.
    """

    q: torch.Tensor  # int8 [B, H, Nq, D]
    k: torch.Tensor  # int8 [B, H, Nk, D], smoothed (k - k_mean)
    vt: torch.Tensor  # float8_e4m3fn [B, H, D, Nk]: V transposed
    q_scale: torch.Tensor  # float32 [B, H, Mq]: absmax / 127 · softmax scale · log2(e)
    k_scale: torch.Tensor  # float32 [B, H, Mk]: absmax / 127
    v_scale: torch.Tensor  # float32 [B, H, Mk]: powers of two, absmax <= 448 · scale
    k_mean: torch.Tensor  # float32 [B, H, D]: the smoothing sample's mean
    q_dot_mean: torch.Tensor | None  # float32 [B, H, Nq]: softmax scale · q·k_mean (the LSE's smoothing term)


@functools.lru_cache(maxsize=64)
def smoothing_stride(n: int) -> int:
    """The sample's stride: the integer nearest ``n·(√5 - 1)/2`` that is coprime with n (the next one up)."""
    s = max(1, round(n * 0.6180339887498949))
    while math.gcd(s, n) != 1:
        s += 1
    return s


def smoothing_rows(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The positions of K's smoothing sample (original token order): ``i·smoothing_stride(n) mod n``, i < 64."""
    return torch.arange(SMOOTH_SAMPLES, device=device) * smoothing_stride(n) % n


def _pow2_scale(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest power of two ``s`` with ``absmax <= 448·s``, and ``1/s`` (float32, exact; absmax >= the floor).

    From absmax's bits (``absmax = 1.f · 2^(E-127)``, 448 = 1.75·2⁸): ``s = 2^(E-135)``, doubled when ``1.f > 1.75``."""
    bits = absmax.float().contiguous().view(torch.int32)
    e = (bits >> 23) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    return (e << 23).view(torch.float32), ((254 - e) << 23).view(torch.float32)


def _blocks(x: torch.Tensor, perm: torch.Tensor | None, block: int, num: int) -> torch.Tensor:
    """float32 ``[B, H, num, block, D]``: x in the plan's token order, zero-padded to ``num`` blocks."""
    b, h, n, d = x.shape
    x = x.float() if perm is None else x.float()[:, :, perm]
    return F.pad(x, (0, 0, 0, num * block - n)).view(b, h, num, block, d)


def _div(x: torch.Tensor | float, y: torch.Tensor | float) -> torch.Tensor:
    """``x / y`` correctly rounded, as the kernel's ``div_rn`` (torch turns a division by or of a Python number into
    a multiplication by a reciprocal: two roundings)."""
    like = x if isinstance(x, torch.Tensor) else y
    full = lambda t: torch.as_tensor(t, dtype=like.dtype, device=like.device).expand_as(like).contiguous()  # noqa: E731
    return torch.div(full(x), full(y))


def _cast(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """``x · (448 / absmax)`` in float8 e4m3 (round to nearest even), absmax broadcast against x."""
    return (x * _div(FP8_MAX, absmax)).to(FP8_DTYPE)


def _cast_int8(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """``x · (127 / absmax)`` in int8, rounded to nearest even (the kernel's :data:`ROUND_MAGIC` rounding)."""
    return ((x * _div(INT8_MAX, absmax) + ROUND_MAGIC) - ROUND_MAGIC).to(torch.int8)


def quantize_fp8_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float, with_lse: bool,
    smooth_k: bool = True,
) -> FP8Inputs:  # fmt: skip
    """:func:`quantize_fp8` in torch (any device): the same formulas in the same order. ``smooth_k=False`` (accuracy
    studies only: the kernel always smooths) quantizes K as it is."""
    b, h, n, d = q.shape
    mq, mk, bq, bk = plan.num_q_blocks, plan.num_kv_blocks, plan.block_q, plan.block_kv
    perm = plan.perm
    k_mean = k[:, :, smoothing_rows(n, k.device)].float().sum(2) * (1.0 / SMOOTH_SAMPLES)
    if not smooth_k:
        k_mean = torch.zeros_like(k_mean)
    sm_log2 = torch.tensor(scale * _LOG2E, dtype=torch.float32)

    qb = _blocks(q, perm, bq, mq)
    q_amax = qb.abs().amax((3, 4)).clamp_min(SCALE_FLOOR)
    q8 = _cast_int8(qb, q_amax[..., None, None]).view(b, h, mq * bq, d)
    q_dot_mean = None
    if with_lse:
        q_dot_mean = (qb * k_mean[:, :, None, None, :]).sum(-1).view(b, h, mq * bq) * torch.tensor(scale)

    valid = (torch.arange(mk * bk, device=q.device) < n).view(1, 1, mk, bk, 1)
    kb = torch.where(valid, _blocks(k, perm, bk, mk) - k_mean[:, :, None, None, :], 0.0)
    k_amax = kb.abs().amax((3, 4)).clamp_min(SCALE_FLOOR)
    k8 = _cast_int8(kb, k_amax[..., None, None]).view(b, h, mk * bk, d)

    vb = _blocks(v, perm, bk, mk)
    v_scale, v_inv = _pow2_scale(vb.abs().amax((3, 4)).clamp_min(V_SCALE_FLOOR))
    v8 = (vb * v_inv[..., None, None]).to(FP8_DTYPE).view(b, h, mk * bk, d)
    return FP8Inputs(
        q8, k8, v8.transpose(-1, -2).contiguous(), _div(q_amax, INT8_MAX) * sm_log2, _div(k_amax, INT8_MAX), v_scale,
        k_mean, q_dot_mean,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- Triton pre-pass
if triton is not None:
    _MAX = tl.constexpr(FP8_MAX)
    _IMAX = tl.constexpr(INT8_MAX)
    _MAGIC = tl.constexpr(ROUND_MAGIC)
    _FLOOR = tl.constexpr(SCALE_FLOOR)
    _V_FLOOR = tl.constexpr(V_SCALE_FLOOR)

    @triton.jit
    def to_int8(x):
        """fp32 ``x`` (``|x| <= 127``) in int8, rounded to nearest even."""
        return ((x + _MAGIC) - _MAGIC).to(tl.int8)

    @triton.jit
    def to_fp8(x, EXACT: tl.constexpr):
        """fp32 ``x`` (``|x| <= 448``) in float8 e4m3, rounded to nearest even. EXACT (for Triton's interpreter, whose
        cast rounds half up and drops the carry into the exponent): round in fp32 first, so that the cast is exact."""
        if EXACT:
            u = x.to(tl.uint32, bitcast=True)
            normal = ((u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)  # keep 3 mantissa bits
            a = tl.abs(x)
            sub = (a + 16384.0) - 16384.0  # a multiple of 2^-9, the subnormal step (2^14's ulp in fp32)
            x = tl.where(a < 0.015625, tl.where(x < 0, -sub, sub), normal)
        return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")

    @triton.jit
    def pow2_scale(absmax):
        """:func:`_pow2_scale` on fp32 ``absmax`` (>= the floor): the power of two ``s`` and ``1/s``."""
        bits = absmax.to(tl.int32, bitcast=True)
        e = (bits >> 23) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_rows(X, base, sxn, PERM, pos, offs_d, N, HAS_PERM: tl.constexpr, OFF64: tl.constexpr):
        """float32 rows of x at plan positions ``pos`` (gathered through PERM), zeros past N."""
        ok = pos < N
        src = pos
        if HAS_PERM:
            src = tl.load(PERM + pos, mask=ok, other=0)
        if OFF64:
            src = src.to(tl.int64)
        x = tl.load((X + base) + (src[:, None] * sxn + offs_d[None, :]), mask=ok[:, None], other=0.0)
        return x.to(tl.float32), ok

    @triton.jit
    def _block_absmax(X, base, sxn, PERM, first, shift, offs_r, offs_d, N,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_PERM: tl.constexpr, OFF64: tl.constexpr):  # fmt: skip
        """The absmax of ``x - shift`` over one plan block's rows (zeros past N)."""
        amax = tl.zeros([offs_d.shape[0]], dtype=tl.float32)
        for r in tl.range(0, BLOCK, ROWS):
            x, ok = _load_rows(X, base, sxn, PERM, first + r + offs_r, offs_d, N, HAS_PERM, OFF64)
            amax = tl.maximum(amax, tl.max(tl.abs(tl.where(ok[:, None], x - shift[None, :], 0.0)), 0))
        return tl.max(amax, 0)

    @triton.jit
    def _sample_mean(K, k_base, skn, offs_d, N, STRIDE, SAMPLES: tl.constexpr):
        """K's smoothing vector: the mean of the keys at ``i·STRIDE mod N`` (read from L2 by every program)."""
        rows = (tl.arange(0, SAMPLES).to(tl.int64) * STRIDE) % N
        return tl.sum(tl.load(K + k_base + rows[:, None] * skn + offs_d[None, :]).to(tl.float32), 0) * (1.0 / SAMPLES)

    @triton.jit
    def _int8_block(X, base, sxn, PERM, X8, SCALE, DOT, dot_scale, m, bh, shift, scale_mul, offs_r, offs_d, N, MB,
                    BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_PERM: tl.constexpr, WITH_DOT: tl.constexpr,
                    OFF64: tl.constexpr):  # fmt: skip
        """Block m of ``x - shift`` in int8 with its scale ``absmax / 127 · scale_mul``; WITH_DOT: also each row's
        ``x·shift · dot_scale`` (Q's LSE term)."""
        first = m * BLOCK
        amax = tl.maximum(_block_absmax(X, base, sxn, PERM, first, shift, offs_r, offs_d, N, BLOCK, ROWS, HAS_PERM,
                                        OFF64), _FLOOR)  # fmt: skip
        inv = tl.math.div_rn(_IMAX, amax)
        tl.store(SCALE + bh * MB + m, tl.math.div_rn(amax, _IMAX) * scale_mul)
        for r in tl.range(0, BLOCK, ROWS):
            pos = first + r + offs_r
            x, ok = _load_rows(X, base, sxn, PERM, pos, offs_d, N, HAS_PERM, OFF64)
            if WITH_DOT:
                tl.store((DOT + bh * MB * BLOCK) + pos, tl.sum(x * dot_scale[None, :], 1))
            x = tl.where(ok[:, None], x - shift[None, :], 0.0)
            d = offs_d.shape[0]
            tl.store((X8 + bh * MB * BLOCK * d) + (pos[:, None] * d + offs_d[None, :]), to_int8(x * inv))

    @triton.jit
    def _quantize_fp8(
        Q, K, V, PERM, Q8, K8, VT8, Q_SCALE, K_SCALE, V_SCALE, K_MEAN, Q_DOT_MEAN,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, N, MQ, MK, STRIDE, sm_log2, sm_scale,
        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, ROWS: tl.constexpr, HEAD_D: tl.constexpr,
        SAMPLES: tl.constexpr, HAS_PERM: tl.constexpr, WITH_LSE: tl.constexpr, EXACT_CAST: tl.constexpr,
        OFF64: tl.constexpr,
    ):  # fmt: skip
        """Program (i, h, b): Q block i (i < MQ), else K block i - MQ (i < MQ + MK), else V block i - MQ - MK, in
        the plan's token order. Each block: absmax over its rows (first loop over ROWS-row chunks), then scale, cast,
        store (second loop; its rows come back from L2)."""
        i = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        bh = b * tl.num_programs(1) + h
        offs_r = tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_D)
        k_base = b * skb + h * skh
        if i < MQ:
            zero = tl.zeros([HEAD_D], dtype=tl.float32)
            dot_scale = zero
            if WITH_LSE:
                dot_scale = _sample_mean(K, k_base, skn, offs_d, N, STRIDE, SAMPLES) * sm_scale
            _int8_block(Q, b * sqb + h * sqh, sqn, PERM, Q8, Q_SCALE, Q_DOT_MEAN, dot_scale, i, bh, zero, sm_log2,
                        offs_r, offs_d, N, MQ, BLOCK_Q, ROWS, HAS_PERM, WITH_LSE, OFF64)  # fmt: skip
        elif i < MQ + MK:
            m = i - MQ
            k_mean = _sample_mean(K, k_base, skn, offs_d, N, STRIDE, SAMPLES)
            if m == 0:
                tl.store(K_MEAN + bh * HEAD_D + offs_d, k_mean)
            _int8_block(K, k_base, skn, PERM, K8, K_SCALE, K_MEAN, k_mean, m, bh, k_mean, 1.0, offs_r, offs_d, N, MK,
                        BLOCK_KV, ROWS, HAS_PERM, False, OFF64)  # fmt: skip
        else:
            m = i - MQ - MK
            v_base = b * svb + h * svh
            first = m * BLOCK_KV
            zero = tl.zeros([HEAD_D], dtype=tl.float32)
            amax = _block_absmax(V, v_base, svn, PERM, first, zero, offs_r, offs_d, N, BLOCK_KV, ROWS, HAS_PERM, OFF64)
            v_scale, v_inv = pow2_scale(tl.maximum(amax, _V_FLOOR))
            tl.store(V_SCALE + bh * MK + m, v_scale)
            for r in tl.range(0, BLOCK_KV, ROWS):
                pos = first + r + offs_r
                x, ok = _load_rows(V, v_base, svn, PERM, pos, offs_d, N, HAS_PERM, OFF64)
                x8 = to_fp8(x * v_inv, EXACT_CAST)
                nk = MK * BLOCK_KV
                tl.store((VT8 + bh * HEAD_D * nk) + (offs_d[:, None] * nk + pos[None, :]), tl.trans(x8))


def _rows_per_chunk(block: int) -> int:
    return min(MAX_ROWS, block & -block)  # the largest power of two dividing the block, at most MAX_ROWS


def quantize_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, perm: torch.Tensor | None, scale: float,
    with_lse: bool,
) -> FP8Inputs:  # fmt: skip
    """The kernel's fp8 inputs (see the module docstring): one Triton launch.

    q, k, v ``[B, H, N, D]`` with unit last stride (any other strides); ``perm``: the plan's permutation as int32
    (the Triton backend's prepared copy) or None; ``with_lse``: also the LSE's smoothing term.
    """
    b, h, n, d = q.shape
    mq, mk, bq, bk = plan.num_q_blocks, plan.num_kv_blocks, plan.block_q, plan.block_kv
    dev = q.device
    x = FP8Inputs(
        q=torch.empty(b, h, mq * bq, d, dtype=torch.int8, device=dev),
        k=torch.empty(b, h, mk * bk, d, dtype=torch.int8, device=dev),
        vt=torch.empty(b, h, d, mk * bk, dtype=FP8_DTYPE, device=dev),
        q_scale=torch.empty(b, h, mq, dtype=torch.float32, device=dev),
        k_scale=torch.empty(b, h, mk, dtype=torch.float32, device=dev),
        v_scale=torch.empty(b, h, mk, dtype=torch.float32, device=dev),
        k_mean=torch.empty(b, h, d, dtype=torch.float32, device=dev),
        q_dot_mean=torch.empty(b, h, mq * bq, dtype=torch.float32, device=dev) if with_lse else None,
    )
    rows = min(_rows_per_chunk(bq), _rows_per_chunk(bk))
    off64 = max((n + max(bq, bk)) * t.stride(2) + d for t in (q, k, v)) >= 2**31  # else int32 row offsets
    _quantize_fp8[(mq + 2 * mk, h, b)](
        q, k, v, perm if perm is not None else x.k_mean, x.q, x.k, x.vt, x.q_scale, x.k_scale, x.v_scale, x.k_mean,
        x.q_dot_mean if with_lse else x.k_mean, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], n, mq, mk,
        smoothing_stride(n), scale * _LOG2E, scale, BLOCK_Q=bq, BLOCK_KV=bk, ROWS=rows, HEAD_D=d, SAMPLES=SMOOTH_SAMPLES,
        HAS_PERM=perm is not None, WITH_LSE=with_lse, EXACT_CAST=_INTERPRET, OFF64=off64, num_warps=4,
        **({} if _INTERPRET else {"enable_fp_fusion": False}),  # x·inv + M must round twice, as the emulation does
    )  # fmt: skip
    return x


# ----------------------------------------------------------------------------------------------------- emulation
def _position_blocks(plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block mask and, per plan position, its query block and its key block."""
    position = torch.arange(plan.seq_len, device=plan.device)
    return plan.block_mask(), position // plan.block_q, position // plan.block_kv


def emulate_fp8_attention(call: AttentionCall, smooth_k: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``precision="fp8"`` in torch: :func:`quantize_fp8_reference`, then attention on the quantized values with P
    quantized to fp8 (scale 448) and fp32 sums, in the plan's token order; the result in the original order.
    Rows with no allowed key give 0 and LSE -inf; HEAD_SKIP heads too. ``smooth_k``: see quantize_fp8_reference."""
    q, plan = call.q, call.plan
    b, h, n, d = q.shape
    x = quantize_fp8_reference(q, call.k, call.v, plan, call.scale, call.return_lse, smooth_k)
    blocks, q_block, kv_block = plan.derived("fp8-emulation", lambda: _position_blocks(plan))
    q8, k8 = x.q.float()[:, :, :n], x.k.float()[:, :, :n]
    v = x.vt.float()[..., :n].transpose(-1, -2) * x.v_scale[:, :, kv_block, None]  # exact: powers of two
    q_scale, k_scale = x.q_scale[:, :, q_block], x.k_scale[:, :, kv_block]  # [B, H, N] per plan position
    keys = None
    if call.kv_len is not None:
        original = plan.perm if plan.perm is not None else torch.arange(n, device=q.device)
        keys = (original[None, :] < call.kv_len[:, None])[:, None, None, :]  # [B, 1, 1, N]
    out = torch.empty(b, h, n, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device) if call.return_lse else None
    rows = max(1, (1 << 26) // max(1, b * h * n))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        scores = (q8[:, :, s:e] @ k8.transpose(-1, -2)) * (q_scale[:, :, s:e, None] * k_scale[:, :, None, :])
        mask = blocks[:, :, q_block[s:e]][..., kv_block]
        if keys is not None:
            mask = mask & keys
        scores = scores.masked_fill(~mask, float("-inf"))
        row_max = scores.amax(-1)
        row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
        p = torch.exp2(scores - row_max[..., None])
        row_sum = p.sum(-1)
        empty = row_sum == 0
        pv = (p * FP8_MAX).to(FP8_DTYPE).float() @ v
        out[:, :, s:e] = pv / torch.where(empty, 1.0, row_sum)[..., None] * (1.0 / FP8_MAX)
        if lse is not None:
            row_lse = (row_max + torch.log2(row_sum)) * _LN2 + x.q_dot_mean[:, :, s:e]
            lse[:, :, s:e] = torch.where(empty, float("-inf"), row_lse)
    if plan.perm is not None:
        out = out[:, :, plan.inv_perm]
        lse = None if lse is None else lse[:, :, plan.inv_perm]
    return mask_skipped_heads(plan, out.to(q.dtype), lse)


__all__ = ["FP8Inputs", "FP8_MAX", "emulate_fp8_attention", "quantize_fp8", "quantize_fp8_reference"]
