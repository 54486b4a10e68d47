"""``adaspa``: AdaSpa (Xia et al. 2025, "Training-free and Adaptive Sparse Attention for Efficient Long Video
Generation", arXiv 2502.21079: the blockified pattern, the Fused LSE-Cached Search and the head-adaptive block
sparse attention of its method section; defaults from its experimental setup). No official code is public.

- **Blockified pattern.** Blocks of ``block_size`` consecutive tokens in the model's own order (no permutation). At
  a search step every (query block, key block) pair is scored by its exact softmax mass
  ``sum exp(scale · q·k − LSE_row)``, and every query-block row keeps the same number of key blocks, its
  highest-mass ones (top-k). Text rows and columns are always kept (the modality level of the paper's hierarchy),
  and so is each query block's diagonal block; both count towards the row's k.
- **LSE-cached search.** At the first search step of a layer (and CFG pass) the call runs dense attention through
  the kernel, which also returns each row's LSE; a scoring pass then uses that LSE. The LSE is cached in the step
  context, and later search steps score with the cached LSE in a single pass (no dense pass), relying on the
  paper's finding that the LSE hardly changes across denoising steps. Between searches the plan is reused.
- **Head-adaptive sparsity.** With base sparsity ``s``, each head's recall is the share of its (video rows')
  attention mass that the top-k blocks at sparsity ``s`` capture. With ``n`` the number of heads whose recall
  exceeds ``recall`` (capped at ``H // 2``), the ``n`` best heads get sparsity ``(1 + s) / 2`` and the ``n`` worst
  ``(3s − 1) / 2`` (clamped at 0): the mean stays ``s``. Per sample of the batch. The rule ranks all heads of a
  layer: under Ulysses context parallelism (each rank holds ``H/w`` heads, ``StepContext.head_offset``) the recalls
  of every rank are all-gathered over the Ulysses group (:func:`dit_sparse.parallel.gather_heads`, ``B x H`` floats
  once per search) and each rank applies the rule to its own heads: the plans equal the single-process ones. Plans,
  LSE and statistics stay the rank's own heads'.

Defaults (paper): ``sparsity = 0.8``, ``recall = 0.8``, ``block_size = 64``, dense for the first 10 of 50 steps
(``dense_steps = 10``), searches at steps 10 and 30 (``search_interval = 20``: a search at ``dense_steps`` and
every ``search_interval`` steps after it).

Choices and deviations:
- The schedule is in denoising steps, as in the paper at 50 steps. The dense warm-up follows the pipeline's step
  count (``S / 5`` steps, from its scheduler); ``search_interval`` does not: for ``S`` steps use
  ``search_interval ≈ 2S / 5`` (e.g. 4 at 10 steps). Whatever the schedule, the first sparse call of a
  layer always searches (e.g. with ``dense_steps=0``), and a layer that a Diffusers cache (FirstBlockCache, ...)
  skipped at a search step searches at its next call.
- The output of a first search step is the dense pass's output (exact); at a later search step it is the new plan's
  sparse output. The paper leaves the output of its fused search kernel implicit.
- The scoring pass is :func:`dit_sparse.kernels.block_mass.block_mass`: on CUDA one fused Triton pass (``q·kᵀ``
  and the exponentials reduced per block pair in registers; about 0.7x a dense attention call), in torch elsewhere.
  It is a pass of its own after the dense one rather than fused into it: the mass needs the row's final LSE, which
  the dense pass only knows at its end. ``benchmarks/methods.py`` times it as ``adaspa:search-step``. It ignores key
  padding (HunyuanVideo's padded text keys): they only add mass to text columns, which are kept anyway.
- The paper's pseudocode writes ``Log(qk − LSE)`` where ``exp(scale · qk − LSE)`` is meant. Scores use the
  ``1/√D`` scale: methods are not handed the call's own scale, and the supported Diffusers models use the default.
- Memory: each (layer, CFG pass) keeps its plan (int32 ``[B, H, M, M]``, ``M = ceil(N / block_size)``) and its LSE
  (float32 ``[B, H, N]``) for the whole generation: at 75,600 tokens, 12 heads and 64-token blocks about 67 MB and
  4 MB per layer and pass; ``block_size=128`` divides the plan by 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_sparse.kernels.block_mass import block_mass
from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Kernel, Method, MethodConfig, check_range, register
from dit_sparse.methods.selection import forced_blocks, keep_count, keep_first, rank_rows, text_blocks
from dit_sparse.parallel import gather_heads
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext

_CACHE_KEY = "adaspa"


@dataclass(frozen=True)
class AdaSpaConfig(MethodConfig):
    """Hyper-parameters of ``adaspa`` (defaults: the paper's; see the module docstring).

    Attributes:
        sparsity: base share of key blocks each query-block row drops (default 0.8).
        recall: a head whose top-k blocks at ``sparsity`` capture more than this share of its attention mass counts
            as easy (default 0.8).
        head_adaptive: move the easy heads to sparsity ``(1 + s) / 2`` and as many hard ones to ``(3s - 1) / 2``
            (default True).
        search_interval: steps between searches after the first (default 20: searches at steps 10 and 30 of 50;
            0: search once).
        block_size: block size in tokens (default 64).
        dense_steps: dense warm-up denoising steps (default None: 10 of 50, scaled to the pipeline's step count;
            see :class:`MethodConfig`).
        dense_layers: leading dense self-attention layers (default 0).
    """

    dense_steps_at_50: ClassVar[int] = 10

    sparsity: float = 0.8
    recall: float = 0.8
    head_adaptive: bool = True
    search_interval: int = 20
    block_size: int = 64
    dense_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "sparsity", 0.0, 1.0)
        if self.sparsity >= 1.0:
            raise ValueError(f"AdaSpaConfig.sparsity must be < 1 (1 would drop every block), got {self.sparsity!r}")
        check_range(self, "recall", 0.0, 1.0)
        if self.search_interval < 0:
            raise ValueError(
                f"AdaSpaConfig.search_interval must be >= 0 (0: search once), got {self.search_interval!r}"
            )


@dataclass
class SearchState:
    """What one (layer, CFG pass) keeps between steps (in its ``StepContext.cache``)."""

    plan: BlockPlan
    lse: torch.Tensor  # float32 [B, H, N], from the first search step's dense pass
    step: int  # step of the last search
    recall: torch.Tensor  # float32 [B, H]: each head's recall at the base sparsity
    sparsity: torch.Tensor  # float32 [B, H]: each head's sparsity after the head-adaptive rule


@register
class AdaSpa(Method):
    """Top-k blocks by exact attention mass, searched on a schedule with a cached LSE (see the module docstring)."""

    name = "adaspa"
    config_cls = AdaSpaConfig
    dynamic = True
    stateful = True

    # ---------------------------------------------------------------- schedule
    @property
    def cycle_steps(self) -> int:
        """``search_interval`` (1 when searching once): one search step with the cached LSE, then reuses of its
        plan. A layer's first search (dense pass + scoring) comes before the first cycle."""
        return max(1, self.config.search_interval)

    def needs_search(self, state: SearchState | None, q: torch.Tensor, ctx: StepContext) -> bool:
        """Whether this call searches: no usable plan yet, or a scheduled search step (``dense_steps + i ·
        search_interval``) has come since the last search (also when a cache hit skipped the layer at that step)."""
        b, h, n, _ = q.shape
        if state is None or state.plan.seq_len != n or state.plan.batch != b or state.plan.heads != h:
            return True
        cfg, warmup = self.config, self.warmup(ctx)
        if cfg.search_interval == 0 or ctx.step < warmup:
            return False
        latest = warmup + (ctx.step - warmup) // cfg.search_interval * cfg.search_interval
        return state.step < latest

    # ---------------------------------------------------------------- search
    def select(
        self, mass: torch.Tensor, layout: TokenLayout, ctx: StepContext | None = None
    ) -> tuple[BlockPlan, torch.Tensor, torch.Tensor]:
        """Plan from block masses ``[B, H, M, M]``: per-row top-k with head-adaptive k; also recall and sparsity.

        ``ctx`` (default None: ``mass`` holds every head of the layer) places the heads among the layer's heads under
        context parallelism: the head-adaptive rule then ranks the recalls of every rank's heads.
        """
        cfg = self.config
        b, h, m, _ = mass.shape
        text = text_blocks(layout, cfg.block_size, device=mass.device)
        forced = forced_blocks(text, diagonal=True)
        order, cum = rank_rows(mass, forced)
        s = cfg.sparsity
        k_base = keep_count(1.0 - s, m)
        video_rows = (~text).float()
        captured = (cum[..., k_base - 1] * video_rows).sum(-1)
        recall = captured / (cum[..., -1] * video_rows).sum(-1).clamp_min(1e-30)  # [B, H]
        sparsity = torch.full_like(recall, s)
        k: torch.Tensor | int = k_base
        group, offset = (None, 0) if ctx is None else (ctx.head_group, ctx.head_offset)
        layer_heads = h if ctx is None or ctx.layer_heads is None else ctx.layer_heads
        if cfg.head_adaptive and layer_heads > 1:
            every = recall if group is None else gather_heads(recall, group)  # [B, layer_heads]
            easy = (every > cfg.recall).sum(-1, keepdim=True).clamp(max=layer_heads // 2)  # [B, 1]
            rank = every.argsort(-1, descending=True).argsort(-1)[:, offset : offset + h]  # 0 = highest recall
            s_hi, s_lo = (1.0 + s) / 2.0, max(0.0, (3.0 * s - 1.0) / 2.0)
            best, worst = rank < easy, rank >= layer_heads - easy
            k = torch.where(best, keep_count(1.0 - s_hi, m), torch.where(worst, keep_count(1.0 - s_lo, m), k_base))
            sparsity = torch.where(best, s_hi, torch.where(worst, s_lo, sparsity))
        mask = keep_first(order, k) | forced
        plan = BlockPlan.from_block_mask(mask, layout.seq_len, cfg.block_size, density_hint=1.0 - s)
        return plan, recall, sparsity

    def search(
        self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext, lse: torch.Tensor | None
    ) -> BlockPlan:
        """Score every block pair (with ``lse``, or each row's exact LSE when None), select, and cache the result."""
        mass, lse = block_mass(q, k, self.config.block_size, lse)
        plan, recall, sparsity = self.select(mass, layout, ctx)
        ctx.cache[_CACHE_KEY] = SearchState(plan, lse, ctx.step, recall, sparsity)
        return plan

    def _cached_lse(self, state: SearchState | None, q: torch.Tensor) -> torch.Tensor | None:
        if state is None or state.lse.shape != q.shape[:-1]:
            return None
        return state.lse

    # ---------------------------------------------------------------- Method API
    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        """The cached plan, or a new one on a search step (scored with the cached LSE when there is one)."""
        state = ctx.cache.get(_CACHE_KEY)
        if not self.needs_search(state, q, ctx):
            return state.plan
        return self.search(q, k, layout, ctx, self._cached_lse(state, q))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, ctx: StepContext, kernel: Kernel
    ) -> torch.Tensor:
        """A first search step runs dense attention (its output and LSE) then scores; other calls use the plan."""
        state = ctx.cache.get(_CACHE_KEY)
        if self.needs_search(state, q, ctx) and self._cached_lse(state, q) is None:
            out, lse = kernel(q, k, v, self.full_plan(q.shape[-2], q.device), True)
            self.search(q, k, layout, ctx, lse)
            return out
        out, _ = kernel(q, k, v, self.get_plan(q, k, layout, ctx), False)
        return out
