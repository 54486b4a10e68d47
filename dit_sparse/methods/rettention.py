"""``rettention``: Re-ttention (Chen et al., NeurIPS 2025, "Ultra Sparse Visual Generation via Attention Statistical
Reshape", arXiv 2505.22918), re-implemented from the paper's summary and its official code (cccrrrccc/Re-ttention
@bbec1f5: ``module/Cog_processor.py`` for the method, ``scripts/Vbench_category.py`` for the CogVideoX-2B mask and
settings). The paper's full text was not available to us: every default below is taken from that code.

Idea: an ultra-sparse mask keeps only a few percent of each softmax row, so the sparse softmax is normalised over
far less mass than the full one. Re-ttention measures, at a full-attention *refresh* step, what share of each row's
softmax mass the mask holds and what the mask misses, and reuses both at the following sparse steps:

- refresh step (full attention): with the full output ``O`` and LSE ``L``, and the sparse (in-mask) output ``S``
  and LSE ``L_s`` of the same call, cache per query row ``rho = exp(L_s - L)`` (the in-mask share of the softmax
  mass: the official code's ratio of masked to full softmax denominators) and the residual ``R = O - rho · S``; the
  call returns ``O`` (exact dense attention). The dense pass runs our kernel on a full plan (it must return the LSE,
  which torch's SDPA does not), so a refresh step costs one dense plus one sparse attention;
- sparse step: ``out = rho' · S + R`` with the current step's sparse output ``S``, where
  ``rho' = rho + rho_step · k`` and ``k`` is the number of sparse steps since the refresh before this one (the first
  sparse step uses ``rho`` unchanged; the official code adds 0.04 after every sparse step, unclamped, so ``rho'``
  may exceed 1 by up to ``rho_step · (refresh_interval - 2)``; we keep that).
  With unchanged q/k/v the first sparse step therefore reproduces dense attention exactly.

The sparse kernel needs no LSE on sparse steps (``needs_lse`` is False); refresh steps ask the kernel for both LSEs.

Where the cache lives: the official code caches ``R`` after the output projection. We cache it at the attention
output ``[B, H, N, D]``, before the projection: the projection ``W x + b`` is linear, so ``W(rho S) + b + R_after``
with ``R_after = (W O + b) - (W(rho S) + b) = W R`` equals ``W(rho S + R) + b``; the bias cancels in the residual.
Cache per (layer, CFG pass), in ``StepContext.cache`` (cleared with every new generation): ``R`` in the attention's
dtype, ``B·H·N·D`` elements (2 bytes each in bf16), plus ``rho`` in float32, ``B·H·N`` elements. Per layer and CFG
pass in bf16: Wan2.1-1.3B 480p (H 12, N 32,760, D 128) 101 MB (30 layers × 2 passes: 6.0 GB); Wan2.1-14B 720p
(H 40, N 75,600) 774 MB (40 × 2: 62 GB); HunyuanVideo 720p/129 frames (H 24, N 119,056) 731 MB (60 layers, one pass:
44 GB). The official code caches the same number of elements (after the projection).

Sparse mask (the official CogVideoX-2B mask, its "3.1%" setting): a query at in-frame position ``s = h·W + w``
(flattened) attends, in its own frame and in every other frame, the keys whose in-frame position lies within
``±half`` of ``s``, with ``half = int(P · window_fraction) // 2`` (``P`` tokens per frame; 0.03125 · 1350 → ±21 at
CogVideoX-2B), plus all text rows and columns. Built at the kernel's block granularity from the ``window`` method's
geometry: the tokens are viewed as ``T`` frames of one row of ``P`` positions, permuted position-major (all frames of
position 0, then position 1, ...: Sparse-vDiT's multi-diagonal order) so that the pattern is a band, and a block pair
is kept when any of its token pairs lies in the pattern (a superset of the token mask; ``rho`` is measured for
the mask actually computed). Measured block density (128-blocks): Wan2.1 480p/81 frames (21×30×52, ±24 positions)
0.039 (the token mask: 0.031), 720p (21×45×80, ±56) 0.035; CogVideoX1.5 768×1360 (226 text + 11×48×85, ±63) 0.048;
HunyuanVideo 720p/129 frames (33×45×80 + 256 text, ±56) 0.038; CogVideoX-2B (226 text + 13×30×45, ±21) 0.078 (its
token mask: 0.044; short sequences lose more to block granularity).

Schedule (official CogVideoX script, 50 steps): dense for the first 15 steps (``dense_steps = 15``, applied by the
processor), then a refresh every 5 steps (steps 15, 20, ..., 45: ``(step - dense_steps) % refresh_interval == 0``),
sparse in between. ``StepContext`` does not know the pipeline's number of steps, so both are in steps: scale them
by hand for other step counts (about ``0.3·steps`` dense and ``0.1·steps``, at least 2, between refreshes; e.g. the
embedded 10-step model: ``dense_steps=3, refresh_interval=2``). The official HunyuanVideo processor uses 10 dense
steps and PixArt 5 of 20, both refreshing every 5 (and a plain 1-D band over the whole sequence as the mask).

Deviations from the official code (each a choice for correctness or robustness):

- Rows that the sparse plan covers completely (text rows, which attend everything) keep ``rho = 1``: the official
  code also adds the 0.04 steps to them, scaling their exact output by up to 12%.
- The rho schedule and refreshes count denoising steps (``ctx.step``), not calls: a step whose call was skipped
  (e.g. by a Diffusers block cache) does not shift the schedule. A refresh is also forced when the cache is missing,
  built for another shape or dtype, or older than ``refresh_interval`` steps.
- A processor that calls attention several times per layer and step (Mochi loops over the batch) gets one cache per
  call of the step, in call order.
- The mask is block-granular (see above); the official mask is dense and token-exact (it runs dense masked PyTorch).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Kernel, Method, MethodConfig, check_range, register
from dit_sparse.methods.window import window_block_mask
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext

CACHE_KEY = "rettention"
"""Key of this method's state in ``StepContext.cache``."""


@dataclass(frozen=True)
class RettentionConfig(MethodConfig):
    """Hyper-parameters of ``rettention`` (defaults: the official CogVideoX-2B settings).

    Attributes:
        window_fraction: the official code's ``sparsity``: the in-frame window spans ``int(P · window_fraction)``
            positions (``P`` tokens per frame), i.e. ``±(that // 2)`` around the query's position, in every frame
            (default 0.03125, the "3.1%" setting; block density 0.039 at Wan2.1 480p, see the module docstring).
        window: the half-width in in-frame positions directly; overrides ``window_fraction`` (default None).
        refresh_interval: steps from one full-attention refresh to the next, counted from ``dense_steps``
            (default 5).
        rho_step: added to ``rho`` per sparse step since the refresh, after the first (default 0.04, official code).
        dense_steps: dense warm-up steps before the first refresh (default None: 15 of 50, the official CogVideoX
            script, scaled to the pipeline's step count; see :class:`MethodConfig`). ``refresh_interval`` is not
            scaled: set it for short schedules.
        dense_layers: default 0 (the official code makes every layer sparse).
        block_size: kernel block size (default 128).
    """

    dense_steps_at_50: ClassVar[int] = 15

    window_fraction: float = 0.03125
    window: int | None = None
    refresh_interval: int = 5
    rho_step: float = 0.04
    dense_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "window_fraction", 0.0, 1.0)
        check_range(self, "rho_step", 0.0, 1.0)
        if self.window is not None and self.window < 0:
            raise ValueError(f"RettentionConfig.window must be >= 0 in-frame positions, got {self.window!r}")
        if self.refresh_interval < 1:
            raise ValueError(
                f"RettentionConfig.refresh_interval must be >= 1 step (1 = refresh every step), "
                f"got {self.refresh_interval!r}"
            )


def half_window(layout: TokenLayout, window_fraction: float = 0.03125, window: int | None = None) -> int:
    """Half-width of the in-frame window in positions: ``window``, else ``int(P · window_fraction) // 2``."""
    if window is not None:
        return int(window)
    return int(layout.tokens_per_frame * window_fraction) // 2


def rettention_block_mask(
    layout: TokenLayout, block: int, half: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse pattern: boolean ``[M, M]`` block mask in position-major token order, and that permutation.

    A block pair is kept when it holds a (query, key) video pair whose flattened in-frame positions differ by at
    most ``half`` (any two frames), or a text row or column.
    """
    # T frames of one row of P positions: the window's "w" axis is the flattened in-frame position h·W + w
    flat = dataclasses.replace(layout, height=1, width=layout.tokens_per_frame)
    perm = flat.tile_permutation((layout.frames, 1, 1), device=device)  # position-major; text stays in place
    mask = window_block_mask(flat, block, (layout.frames, 0, half), perm=perm, device=device)
    return mask, perm


@dataclass
class _Entry:
    """What one refresh cached: its step, ``rho`` (float32 ``[B, H, N]``) and ``R`` (``[B, H, N, D]``)."""

    step: int
    rho: torch.Tensor
    residual: torch.Tensor


@dataclass
class _LayerState:
    """Per (layer, CFG pass): the step last seen, the calls made in it, one cache entry per call of a step."""

    step: int = -1
    calls: int = 0
    entries: list[_Entry | None] = field(default_factory=list)


@register
class Rettention(Method):
    """Re-ttention: ultra-sparse attention reshaped with the last refresh's softmax statistics (module docstring)."""

    name = "rettention"
    config_cls = RettentionConfig
    stateful = True
    dynamic = False  # the sparse plan is static per layout (cached by get_plan); the statistics live in ctx.cache

    def __init__(self, config: RettentionConfig | None = None) -> None:
        super().__init__(config)
        self._grow: weakref.WeakKeyDictionary[BlockPlan, torch.Tensor] = weakref.WeakKeyDictionary()

    @property
    def needs_lse(self) -> bool:
        """False: sparse steps need no LSE (``rho`` is cached); refresh steps request both LSEs themselves."""
        return False

    @property
    def cycle_steps(self) -> int:
        """Denoising steps of one refresh cycle (one refresh step, ``refresh_interval - 1`` sparse steps): step
        costs differ within a cycle, so benchmarks time whole cycles."""
        return self.config.refresh_interval

    def half_window(self, layout: TokenLayout) -> int:
        return half_window(layout, self.config.window_fraction, self.config.window)

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        """The sparse plan (position-major permutation, in-frame band in every frame, text)."""
        block = self.config.block_size
        mask, perm = rettention_block_mask(layout, block, self.half_window(layout), device=q.device)
        return BlockPlan.from_block_mask(mask, layout.seq_len, block, perm=perm)

    def refresh_due(self, step: int, last_refresh: int | None, dense_steps: int | None = None) -> bool:
        """Whether a call at ``step`` runs full attention, given the step of the cached refresh (None: no cache) and
        the warm-up in force (None: the config's unscaled)."""
        cfg = self.config
        warmup = cfg.warmup_steps(None) if dense_steps is None else dense_steps
        if last_refresh is None or step < last_refresh:
            return True
        if step == last_refresh:  # called again in the refresh step: reuse what it cached
            return False
        return step - last_refresh >= cfg.refresh_interval or (step - warmup) % cfg.refresh_interval == 0

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, ctx: StepContext, kernel: Kernel
    ) -> torch.Tensor:
        """Refresh step: dense output, caching ``rho`` and ``R``; sparse step: ``rho' · S + R``."""
        plan = self.get_plan(q, k, layout, ctx)
        state = ctx.cache.get(CACHE_KEY)
        if state is None:
            state = ctx.cache[CACHE_KEY] = _LayerState()
        if ctx.step != state.step:
            state.step, state.calls = ctx.step, 0
        else:
            state.calls += 1
        slot = state.calls
        if len(state.entries) <= slot:
            state.entries.extend([None] * (slot + 1 - len(state.entries)))
        entry = state.entries[slot]
        res = None if entry is None else entry.residual
        if res is not None and (
            res.shape != (*q.shape[:-1], v.shape[-1]) or res.dtype != q.dtype or res.device != q.device
        ):
            entry = None
        if self.refresh_due(ctx.step, None if entry is None else entry.step, self.warmup(ctx)):
            out, state.entries[slot] = self._refresh(q, k, v, plan, ctx.step, kernel)
            return out
        sparse, _ = kernel(q, k, v, plan, False)
        rho = entry.rho
        since = ctx.step - entry.step - 1
        if since > 0 and self.config.rho_step > 0:
            rho = rho + (self.config.rho_step * since) * self._grow_rows(plan)
        return torch.addcmul(entry.residual, sparse, rho.unsqueeze(-1).to(sparse.dtype))

    def _refresh(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, step: int, kernel: Kernel
    ) -> tuple[torch.Tensor, _Entry]:
        """Dense and sparse attention of one call; ``rho = exp(L_s - L)``, ``R = O - rho · S``."""
        full, lse_full = kernel(q, k, v, self.full_plan(q.shape[-2], q.device), True)
        sparse, lse_sparse = kernel(q, k, v, plan, True, aux_work=True)  # statistics for the next steps
        if lse_full is None or lse_sparse is None:
            raise RuntimeError("rettention: the kernel returned no LSE on a refresh step (return_lse=True)")
        # rows with no key at all (LSE -inf on both sides) get rho = 0 and R = O
        rho = torch.exp(lse_sparse - lse_full).nan_to_num_(0.0).clamp_(0.0, 1.0)
        residual = torch.addcmul(full, sparse, rho.unsqueeze(-1).to(sparse.dtype), value=-1)
        return full, _Entry(step, rho, residual)

    def _grow_rows(self, plan: BlockPlan) -> torch.Tensor:
        """Float ``[N]`` in the original token order: 1 where ``rho`` grows, 0 on rows the plan covers completely."""
        grow = self._grow.get(plan)
        if grow is None:
            complete = plan.kv_num_blocks[0, 0] == plan.num_kv_blocks  # [Mq]; the plan broadcasts over B and H
            rows = complete.repeat_interleave(plan.block_q)[: plan.seq_len]
            if plan.inv_perm is not None:
                rows = rows[plan.inv_perm]
            grow = self._grow[plan] = (~rows).float()
        return grow
