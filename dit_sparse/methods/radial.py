"""``radial``: Radial Attention (Li et al. 2025, "O(n log n) Sparse Attention with Energy Decay", §4.1 and App. A).

A static mask: a query in frame ``i`` attends a key in frame ``j`` when their in-frame (flattened ``h·W + w``) indices
lie within a window that shrinks with the temporal distance ``d = |i - j|``, re-implemented from the official code
(mit-han-lab/radial-attention @72788d4, ``radial_attn/attn_mask.py``):

- ``d <= 1``: the frame pair is dense;
- otherwise, with ``P`` tokens per frame and ``base = 2**bitlen(P) / 2**bitlen(d)`` (halving each time ``d``
  passes a power of two), the window is ``max(base · decay, min_window)`` tokens (``|r - c| <= window``);
- once ``base < min_window`` only every ``int(min_window / base)``-th frame distance is kept (``d % split == 0``),
  the others are dropped: per query, a constant number of key frames per power-of-two distance group, each with a
  ``min_window`` band: O(n log n) overall;
- Wan variant (``sink=True``): key frame 0 is a dense "attention sink" column for every query frame;
- text rows and columns (HunyuanVideo, Mochi, CogVideoX layouts) are attended fully.

The token mask becomes a block mask with the official column-density rule, evaluated exactly per (query block,
key block, frame pair) in closed form (no ``N × N`` tensor, no Python loop per block): a block pair is kept when
more than 60% of its key columns that receive any attention receive it from more than a third of the block's
``block_size`` rows.

Defaults (the official Wan2.1 script ``scripts/wan_t2v_inference.sh``): ``decay=0.2``, ``sink=True``,
``dense_layers=1``, ``dense_steps=12`` (denoising steps, of 50), ``block_size=128``, ``min_window=128``.
HunyuanVideo's script uses ``decay=0.95, sink=False, dense_layers=0, dense_steps=12``; Wan2.2's
``decay=0.8, dense_layers=1, dense_steps=11`` with 64-token blocks.

Deviations from the official code (all measured, see tests/test_radial.py):
- Frame pairs that are dense (``d <= 1`` and the sink column) keep every block pair they touch. The official
  column-density rule drops a frame's share of a block that straddles a frame border when that share is under a
  third of the block, so a few "dense" token pairs were never computed; keeping them adds < 1% density.
- A frame whose tokens start late in a block (480p: ``P = 1560``) keeps its last rows here; the official
  shrink cuts each frame pair's padded mask to ``floor(padded / block)`` blocks and loses them.
- Any sequence length works: blocks need not align with frames and the last block may be partial (the official
  mask requires ``N`` to be a multiple of 128 and drops the tail block otherwise).
- ``min_window`` is both the window floor (official: the block size) and the frame-dropping threshold (official:
  a hard-coded 128); they coincide at the default block size.
- The plan is cached per layout (and head count) inside the method, not once per process: a new resolution or
  frame count gets its own mask.
Measured block density (this implementation vs the official mask, 81 frames): Wan2.1 480p 0.340 vs 0.338,
720p 0.263 vs 0.262.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Method, MethodConfig, register
from dit_sparse.plan import BlockPlan, add_text
from dit_sparse.state import StepContext

_PAIR_CHUNK = 1 << 20  # segment pairs evaluated at once (bounds the temporaries to a few tens of MB)


@dataclass(frozen=True)
class RadialConfig(MethodConfig):
    """Hyper-parameters of ``radial`` (defaults: the official Wan2.1 settings).

    Attributes:
        decay: scale of the spatial window (official ``decay_factor``; default 0.2, Wan2.1).
        min_window: smallest spatial window in tokens, and the threshold below which frame distances are
            dropped (default 128).
        sink: key frame 0 is attended densely by every frame (Wan's attention sink; default True).
        dense_steps: dense warm-up denoising steps (default None: 12 of 50, official ``dense_timesteps``, scaled
            to the pipeline's step count; see :class:`MethodConfig`).
        dense_layers: leading dense self-attention layers (default 1, official ``dense_layers``).
        block_size: kernel block size in tokens (default 128, official).
    """

    dense_steps_at_50: ClassVar[int] = 12

    decay: float = 0.2
    min_window: int = 128
    sink: bool = True
    dense_steps: int | None = None
    dense_layers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.decay > 0:
            raise ValueError(f"RadialConfig.decay must be > 0, got {self.decay!r}")
        if self.min_window < 1:
            raise ValueError(f"RadialConfig.min_window must be >= 1, got {self.min_window!r}")


def distance_rules(frames: int, tokens_per_frame: int, decay: float, min_window: int) -> tuple[list[bool], list[int]]:
    """Per temporal distance ``d`` in ``[0, frames)``: whether the frame pair is kept at all, and its window in tokens.

    ``window >= tokens_per_frame`` means the pair is dense. One entry per distance (not per block or token).
    """
    p = tokens_per_frame
    keep, window = [], []
    for d in range(frames):
        if d <= 1:
            keep.append(True)
            window.append(p)
            continue
        base = 2 ** p.bit_length() / 2 ** d.bit_length()
        kept = base >= min_window or d % int(min_window / base) == 0
        keep.append(kept)
        # official: |r - c| <= max(base * decay, threshold) with a float bound
        window.append(min(p, int(max(base * decay, min_window))))
    return keep, window


def _overlap(lo1: torch.Tensor, hi1: torch.Tensor, lo2: torch.Tensor, hi2: torch.Tensor) -> torch.Tensor:
    """Length of ``[lo1, hi1] ∩ [lo2, hi2]`` (inclusive integer intervals), 0 when empty."""
    return (torch.minimum(hi1, hi2) - torch.maximum(lo1, lo2) + 1).clamp(min=0)


def video_segments(
    layout: TokenLayout, block: int, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Split every block into its per-frame pieces: block id, frame, first and last in-frame index (inclusive).

    At most ``num_blocks + frames`` segments; vectorised (no loop per block).
    """
    n, p, v0, nv = layout.seq_len, layout.tokens_per_frame, layout.video_start, layout.video_len
    m = -(-n // block)
    starts = torch.arange(m, device=device) * block
    u0 = (starts - v0).clamp(min=0, max=nv)  # video-local [u0, u1) of each block
    u1 = (torch.clamp(starts + block, max=n) - v0).clamp(min=0, max=nv)
    has = u1 > u0
    f0 = torch.where(has, u0 // p, 0)
    f1 = torch.where(has, (u1 - 1) // p, -1)
    counts = (f1 - f0 + 1).clamp(min=0)
    seg_block = torch.repeat_interleave(torch.arange(m, device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    offset = torch.arange(seg_block.numel(), device=device) - first[seg_block]
    frame = f0[seg_block] + offset
    lo = torch.maximum(u0[seg_block], frame * p) - frame * p
    hi = torch.minimum(u1[seg_block], (frame + 1) * p) - 1 - frame * p
    return {"block": seg_block, "frame": frame, "lo": lo, "hi": hi}


def radial_block_mask(
    layout: TokenLayout,
    block: int,
    decay: float = 0.2,
    min_window: int = 128,
    sink: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[M, M]`` block mask of Radial Attention for ``layout`` (text rows/columns included)."""
    n = layout.seq_len
    m = -(-n // block)
    keep_d, win_d = distance_rules(layout.frames, layout.tokens_per_frame, decay, min_window)
    keep_t = torch.tensor(keep_d, device=device)
    win_t = torch.tensor(win_d, device=device)
    seg = video_segments(layout, block, device)
    mask = torch.zeros(m * m, dtype=torch.bool, device=device)
    high = block // 3 + 1  # official: a column is "dense" when more than a third of the block's rows reach it
    p, t = layout.tokens_per_frame, layout.frames
    # segments grouped by frame: a [T, S] table (S = most segments of one frame), -1 where empty
    frame = seg["frame"]
    first = torch.searchsorted(frame, torch.arange(t, device=device))
    slot = torch.arange(frame.numel(), device=device) - first[frame]
    width = int(slot.max()) + 1 if frame.numel() else 1
    table = torch.full((t, width), -1, dtype=torch.long, device=device)
    table[frame, slot] = torch.arange(frame.numel(), device=device)
    # frame pairs that are computed at all (a T × T table, not a per-block loop)
    fi, fj = torch.meshgrid(torch.arange(t, device=device), torch.arange(t, device=device), indexing="ij")
    d = (fi - fj).abs()
    kept = keep_t[d] | (sink & (fj == 0))
    fi, fj, d = fi[kept], fj[kept], d[kept]
    w_all = win_t[d]
    dense_all = (w_all >= p) | (sink & (fj == 0))
    chunk = max(1, _PAIR_CHUNK // (width * width))
    for c0 in range(0, fi.numel(), chunk):  # chunks of frame pairs
        qs = table[fi[c0 : c0 + chunk]][:, :, None]  # [K, S, 1] query segments
        ks = table[fj[c0 : c0 + chunk]][:, None, :]  # [K, 1, S] key segments
        w = w_all[c0 : c0 + chunk, None, None]
        valid = (qs >= 0) & (ks >= 0)
        qs, ks = qs.clamp(min=0), ks.clamp(min=0)
        qlo, qhi, klo, khi = seg["lo"][qs], seg["hi"][qs], seg["lo"][ks], seg["hi"][ks]
        nonzero = _overlap(klo, khi, qlo - w, qhi + w)
        tall = ((qhi - qlo + 1) >= high) & ((2 * w + 1) >= high)
        strong = torch.where(tall, _overlap(klo, khi, qlo + high - 1 - w, qhi - high + 1 + w), 0)
        band = 5 * strong > 3 * nonzero  # official: strong / nonzero > 0.6
        keep = valid & (dense_all[c0 : c0 + chunk, None, None] | band)
        idx = (seg["block"][qs] * m + seg["block"][ks])[keep]
        mask[idx] = True
    mask = mask.view(m, m)
    return add_text(mask, layout, block, block)


@register
class Radial(Method):
    """Static Radial Attention mask (see the module docstring for the rule, defaults and deviations)."""

    name = "radial"
    config_cls = RadialConfig

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        cfg = self.config
        mask = radial_block_mask(layout, cfg.block_size, cfg.decay, cfg.min_window, cfg.sink, device=q.device)
        return BlockPlan.from_block_mask(mask, layout.seq_len, cfg.block_size)
