"""FP8 attention (``precision="fp8"``): SageAttention2-style quantization of q, k, v, and its torch emulation.

INT8 Q·Kᵀ and FP8 P·V, as SageAttention2 does (Zhang et al. 2024, §3): with Q·Kᵀ in FP8 e4m3 (3 mantissa bits) the
attention outputs of the embedded model were 2.4% off fp32 (relative L2), with INT8 0.8%
(``benchmarks/results/fp8-accuracy-2026-12-04-int8.md``); both run on the same 8-bit tensor cores. The quantization (the Triton pre-pass :func:`quantize_fp8`, mirrored op for op by
:func:`quantize_fp8_reference`):

- **Token order, padding.** Quantized tensors are written in the plan's token order (permuted when the plan has a
  permutation: the attention kernel then reads them without a gather, through TMA where it can) and padded with
  zeros to whole plan blocks.
- **K smoothing.** ``k - mean(k)`` (mean over all N tokens per (b, h, channel); exact for the softmax: every score of
  a row moves by the same ``q·mean``). The LSE, when asked for, gets that term back (``q_dot_mean``).
- **Q, K:** INT8 (round to nearest even, ±127) with one scale per (b, h, plan block): ``absmax / 127``; Q's scale
  carries the softmax scale and ``log2(e)`` (the kernel's ``exp2`` domain), so a key tile's score scale is one
  product ``q_scale · k_scale``. The int32 dot products are exact (``|q·k| <= 127²·D < 2²²`` for D <= 256).
- **V:** FP8 e4m3 with one scale per (b, h, channel) (``absmax`` over all tokens ``/ 448``), applied to the output;
  stored transposed, ``[B, H, D, N]``, because an fp8 tensor-core dot (Hopper wgmma) takes its second operand
  K-major only.
- **P** (the softmax numerators, in [0, 1]): FP8 e4m3 with the fixed scale 448; P·V accumulates in fp32 per key
  tile (Hopper's fp8 MMA accumulates in reduced precision), the row sums and the LSE in fp32.

The statistics (K's mean, V's channel absmax) need every token before any block is cast: a first small Triton kernel
writes per-chunk partial sums and maxima, reduced in torch over ``[B, H, chunks, D]``; the second kernel does all the
per-block work (gather, mean subtraction, absmax, scale, cast, transposed store) for Q, K and V in one pass.

The emulation (``backend="reference", precision="fp8"``: CPU tests and accuracy studies) quantizes with the same
formulas in the same order (the Q and V scales and the quantized tensors match the kernel's bit for bit; K's mean may
differ in its last bit, the order of a float sum) and then runs the attention in one pass per row where the kernel's
online softmax quantizes P against a running maximum: the two agree closely, not bitwise.
"""

from __future__ import annotations

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
STATS_ROWS = 64
"""Tokens per partial sum / maximum of the statistics pass."""
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
    v_scale: torch.Tensor  # float32 [B, H, D]: channel absmax / 448
    k_mean: torch.Tensor  # float32 [B, H, D]
    q_dot_mean: torch.Tensor | None  # float32 [B, H, Nq]: softmax scale · q·k_mean (the LSE's smoothing term)


def _stats_reference(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K's mean and V's channel absmax over all tokens, summed per :data:`STATS_ROWS` chunk like the kernel."""
    b, h, n, d = k.shape
    chunks = -(-n // STATS_ROWS)
    pad = (0, 0, 0, chunks * STATS_ROWS - n)
    k_sum = F.pad(k.float(), pad).view(b, h, chunks, STATS_ROWS, d).sum(3)
    v_max = F.pad(v.float().abs(), pad).view(b, h, chunks, STATS_ROWS, d).amax(3)
    return k_sum.sum(2) / n, v_max.amax(2)


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
    k_mean, v_amax = _stats_reference(k, v)
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

    v_amax = v_amax.clamp_min(SCALE_FLOOR)
    v8 = _cast(_blocks(v, perm, bk, mk).view(b, h, mk * bk, d), v_amax[:, :, None, :])
    return FP8Inputs(
        q8, k8, v8.transpose(-1, -2).contiguous(), _div(q_amax, INT8_MAX) * sm_log2, _div(k_amax, INT8_MAX),
        _div(v_amax, FP8_MAX), k_mean, q_dot_mean,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- Triton pre-pass
if triton is not None:
    _MAX = tl.constexpr(FP8_MAX)
    _IMAX = tl.constexpr(INT8_MAX)
    _MAGIC = tl.constexpr(ROUND_MAGIC)
    _FLOOR = tl.constexpr(SCALE_FLOOR)

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
    def _kv_stats(K, V, K_SUM, V_MAX, skb, skh, skn, svb, svh, svn, N, ROWS: tl.constexpr, HEAD_D: tl.constexpr):
        """Partial sum of K and partial absmax of V over one chunk of ROWS tokens: [B, H, chunks, D] each."""
        c = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        rows = (c * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        offs_d = tl.arange(0, HEAD_D)
        ok = (rows < N)[:, None]
        k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + offs_d[None, :], mask=ok, other=0.0)
        v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + offs_d[None, :], mask=ok, other=0.0)
        out = ((b * tl.num_programs(1) + h) * tl.num_programs(0) + c) * HEAD_D + offs_d
        tl.store(K_SUM + out, tl.sum(k.to(tl.float32), 0))
        tl.store(V_MAX + out, tl.max(tl.abs(v.to(tl.float32)), 0))

    @triton.jit
    def _load_rows(X, base, sxn, PERM, pos, offs_d, N, HAS_PERM: tl.constexpr):
        """float32 rows of x at plan positions ``pos`` (gathered through PERM), zeros past N."""
        ok = pos < N
        src = pos
        if HAS_PERM:
            src = tl.load(PERM + pos, mask=ok, other=0)
        x = tl.load(X + base + src.to(tl.int64)[:, None] * sxn + offs_d[None, :], mask=ok[:, None], other=0.0)
        return x.to(tl.float32), ok

    @triton.jit
    def _quantize_fp8(
        Q, K, V, PERM, K_MEAN, V_AMAX, Q8, K8, VT8, Q_SCALE, K_SCALE, V_SCALE, Q_DOT_MEAN,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, N, MQ, MK, sm_log2, sm_scale,
        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, ROWS: tl.constexpr, HEAD_D: tl.constexpr,
        HAS_PERM: tl.constexpr, WITH_LSE: tl.constexpr, EXACT_CAST: tl.constexpr,
    ):  # fmt: skip
        """Program (m, h, b): Q block m (when m < MQ) and K, V block m (when m < MK), in the plan's token order.
        Each block: absmax over its rows (first pass over ROWS-row chunks), then scale, cast, store (second)."""
        m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        bh = b * tl.num_programs(1) + h
        offs_r = tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_D)
        nq, nk = MQ * BLOCK_Q, MK * BLOCK_KV
        k_mean = tl.load(K_MEAN + bh * HEAD_D + offs_d)
        if m < MQ:
            amax = tl.zeros([HEAD_D], dtype=tl.float32)
            for r in tl.range(0, BLOCK_Q, ROWS):
                x, ok = _load_rows(Q, b * sqb + h * sqh, sqn, PERM, m * BLOCK_Q + r + offs_r, offs_d, N, HAS_PERM)
                amax = tl.maximum(amax, tl.max(tl.abs(x), 0))
            amax = tl.maximum(tl.max(amax, 0), _FLOOR)
            inv = tl.math.div_rn(_IMAX, amax)
            tl.store(Q_SCALE + bh * MQ + m, tl.math.div_rn(amax, _IMAX) * sm_log2)
            for r in tl.range(0, BLOCK_Q, ROWS):
                pos = m * BLOCK_Q + r + offs_r
                x, ok = _load_rows(Q, b * sqb + h * sqh, sqn, PERM, pos, offs_d, N, HAS_PERM)
                tl.store(Q8 + (bh * nq + pos)[:, None] * HEAD_D + offs_d[None, :], to_int8(x * inv))
                if WITH_LSE:
                    tl.store(Q_DOT_MEAN + bh * nq + pos, tl.sum(x * k_mean[None, :], 1) * sm_scale)
        if m < MK:
            amax = tl.zeros([HEAD_D], dtype=tl.float32)
            for r in tl.range(0, BLOCK_KV, ROWS):
                x, ok = _load_rows(K, b * skb + h * skh, skn, PERM, m * BLOCK_KV + r + offs_r, offs_d, N, HAS_PERM)
                amax = tl.maximum(amax, tl.max(tl.abs(tl.where(ok[:, None], x - k_mean[None, :], 0.0)), 0))
            amax = tl.maximum(tl.max(amax, 0), _FLOOR)
            inv = tl.math.div_rn(_IMAX, amax)
            tl.store(K_SCALE + bh * MK + m, tl.math.div_rn(amax, _IMAX))
            v_amax = tl.maximum(tl.load(V_AMAX + bh * HEAD_D + offs_d), _FLOOR)
            v_inv = tl.math.div_rn(_MAX, v_amax)
            if m == 0:
                tl.store(V_SCALE + bh * HEAD_D + offs_d, tl.math.div_rn(v_amax, _MAX))
            for r in tl.range(0, BLOCK_KV, ROWS):
                pos = m * BLOCK_KV + r + offs_r
                x, ok = _load_rows(K, b * skb + h * skh, skn, PERM, pos, offs_d, N, HAS_PERM)
                x = tl.where(ok[:, None], x - k_mean[None, :], 0.0)
                tl.store(K8 + (bh * nk + pos)[:, None] * HEAD_D + offs_d[None, :], to_int8(x * inv))
                x, ok = _load_rows(V, b * svb + h * svh, svn, PERM, pos, offs_d, N, HAS_PERM)
                x8 = to_fp8(x * v_inv[None, :], EXACT_CAST)
                tl.store(VT8 + (bh * HEAD_D + offs_d)[:, None] * nk + pos[None, :], tl.trans(x8))


def _rows_per_chunk(block: int) -> int:
    return min(STATS_ROWS, block & -block)  # the largest power of two dividing the block, at most 64


def quantize_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, perm: torch.Tensor | None, scale: float,
    with_lse: bool,
) -> FP8Inputs:  # fmt: skip
    """The kernel's fp8 inputs (see the module docstring): two Triton launches and two small torch reductions.

    q, k, v ``[B, H, N, D]`` with unit last stride (any other strides); ``perm``: the plan's permutation as int32
    (the Triton backend's prepared copy) or None; ``with_lse``: also the LSE's smoothing term.
    """
    b, h, n, d = q.shape
    mq, mk, bq, bk = plan.num_q_blocks, plan.num_kv_blocks, plan.block_q, plan.block_kv
    dev = q.device
    chunks = -(-n // STATS_ROWS)
    k_sum = torch.empty(b, h, chunks, d, dtype=torch.float32, device=dev)
    v_max = torch.empty_like(k_sum)
    _kv_stats[(chunks, h, b)](
        k, v, k_sum, v_max, *k.stride()[:3], *v.stride()[:3], n, ROWS=STATS_ROWS, HEAD_D=d, num_warps=4
    )
    k_mean = k_sum.sum(2).div_(n)
    v_amax = v_max.amax(2)
    x = FP8Inputs(
        q=torch.empty(b, h, mq * bq, d, dtype=torch.int8, device=dev),
        k=torch.empty(b, h, mk * bk, d, dtype=torch.int8, device=dev),
        vt=torch.empty(b, h, d, mk * bk, dtype=FP8_DTYPE, device=dev),
        q_scale=torch.empty(b, h, mq, dtype=torch.float32, device=dev),
        k_scale=torch.empty(b, h, mk, dtype=torch.float32, device=dev),
        v_scale=torch.empty(b, h, d, dtype=torch.float32, device=dev),
        k_mean=k_mean,
        q_dot_mean=torch.empty(b, h, mq * bq, dtype=torch.float32, device=dev) if with_lse else None,
    )
    rows = min(_rows_per_chunk(bq), _rows_per_chunk(bk))
    _quantize_fp8[(max(mq, mk), h, b)](
        q, k, v, perm if perm is not None else k_sum, k_mean, v_amax, x.q, x.k, x.vt, x.q_scale, x.k_scale,
        x.v_scale, x.q_dot_mean if with_lse else k_sum, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], n, mq, mk,
        scale * _LOG2E, scale, BLOCK_Q=bq, BLOCK_KV=bk, ROWS=rows, HEAD_D=d, HAS_PERM=perm is not None,
        WITH_LSE=with_lse, EXACT_CAST=_INTERPRET, num_warps=4,
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
    v8 = x.vt.float()[..., :n].transpose(-1, -2)
    q_scale, k_scale = x.q_scale[:, :, q_block], x.k_scale[:, :, kv_block]  # [B, H, N] per plan position
    v_scale = (x.v_scale * (1.0 / FP8_MAX))[:, :, None, :]  # V's scales and P's, as the kernel applies them
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
        pv = (p * FP8_MAX).to(FP8_DTYPE).float() @ v8
        out[:, :, s:e] = pv / torch.where(empty, 1.0, row_sum)[..., None] * v_scale
        if lse is not None:
            row_lse = (row_max + torch.log2(row_sum)) * _LN2 + x.q_dot_mean[:, :, s:e]
            lse[:, :, s:e] = torch.where(empty, float("-inf"), row_lse)
    if plan.perm is not None:
        out = out[:, :, plan.inv_perm]
        lse = None if lse is None else lse[:, :, plan.inv_perm]
    return mask_skipped_heads(plan, out.to(q.dtype), lse)


__all__ = ["FP8Inputs", "FP8_MAX", "emulate_fp8_attention", "quantize_fp8", "quantize_fp8_reference"]
