"""``draft``: DraftAttention (Shen et al. 2025, "Fast Video Diffusion via Low-Resolution Attention Guidance", §3).

At every call, per sample and head: q and k are average-pooled over ``pool = (8, 16)`` spatial patches within each
frame (one draft token per 128 video tokens); a full softmax over the low-resolution draft map ``softmax(q̄ k̄ᵀ/√D)``
(float32); one threshold per head over the whole draft map keeps its ``1 - sparsity`` largest entries; each kept
draft entry is one (query block, key block) pair of the block-sparse kernel, because the tokens are reordered so
that each pooled patch is one contiguous kernel block (the plan's permutation; the output comes back in the
original order). Text rows and columns are attended fully, and every query block keeps its own diagonal block.

Defaults (official code, shawnricecake/draft-attention @f3c81d5, Wan2.1 ``wan/wan/modules/attention.py``):
``sparsity = 0.75``, ``pool = (8, 16)``, ``block_size = 128``, first self-attention layer dense (``dense_layers=1``),
dense while the timestep is above 925, which at Wan's 50 steps with shift 5 is the first 15 steps
(``dense_steps=15``). HunyuanVideo's script: ``sparsity=0.9``, its first two double-stream blocks dense (here
``dense_layers=2``), dense above t = 945 (also about 15 of 50 steps at shift 7).

Deviations from the official code:
- Any resolution and frame count: the permutation (``TokenLayout.tile_permutation`` with tile ``(1, *pool)``) lists
  the video tokens patch by patch and moves text tokens after the video, then each *kernel block* is pooled. When
  the latent height and width are multiples of ``pool`` this is exactly the official patch pooling; otherwise the
  patches at the right and bottom edges are smaller than a block and a block may join two of them (the official
  code asserts two fixed resolutions). A block that is not wholly video (the partial last video block, text) is
  attended densely as a row and as a column.
- Text may come first (CogVideoX) as well as last: it is moved behind the video by the permutation.
- The threshold keeps exactly ``round((1 - sparsity) · Mv²)`` entries of the ``Mv × Mv`` draft map (ties at the
  threshold kept); the official one keeps one more (it keeps ``>=`` the largest of the excluded entries).
- Every query block keeps its diagonal block: with the official threshold a query block can end up with no key block
  at all (an empty softmax row).
- One draft map per sample of the batch (a batched CFG pass gets one per branch, as the official CFG script does;
  its batch-1 script shares the first sample's map).
- The permutation is built once per layout and cached; the official code rebuilds Python index lists every call.
- Draft scores use the ``1/√D`` scale (the official one): methods are not handed the attention call's own scale,
  and the supported Diffusers models use the default.
- The block selection is recomputed at every call (dynamic); the dense warm-up is the shared step policy
  (``dense_steps`` counts denoising steps, independent of the scheduler's timesteps and shift).

Cost per call beyond the sparse attention: one gather of q and k (pooling in permuted order), a ``Mv × Mv`` map per
head (``Mv ≈ N / 128``) and one ``kthvalue`` per head; no device->host sync (the plan carries a ``density_hint``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Method, MethodConfig, check_range, register
from dit_sparse.methods.selection import forced_blocks, keep_count, pool_blocks, select_global
from dit_sparse.plan import BlockPlan, num_blocks
from dit_sparse.state import StepContext


@dataclass(frozen=True)
class DraftConfig(MethodConfig):
    """Hyper-parameters of ``draft`` (defaults: the official Wan2.1 settings, see the module docstring).

    Attributes:
        pool: spatial patch (rows, cols) in latent tokens pooled into one draft token (default (8, 16), official);
            ``rows · cols`` must equal ``block_size``.
        sparsity: share of the video × video draft map that is dropped, per head (default 0.75, official Wan;
            0.9 for HunyuanVideo).
        dense_steps: dense warm-up denoising steps (default None: 15 of 50, official t > 925 at 50 steps, shift
            5, scaled to the pipeline's step count; see :class:`MethodConfig`).
        dense_layers: leading dense self-attention layers (default 1, official Wan).
        block_size: kernel block size in tokens (default 128 = 8 × 16, official).
    """

    dense_steps_at_50: ClassVar[int] = 15

    pool: tuple[int, int] = (8, 16)
    sparsity: float = 0.75
    dense_steps: int | None = None
    dense_layers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.pool) < 1:
            raise ValueError(f"DraftConfig.pool must be two sizes (rows, cols) >= 1, got {self.pool}")
        if math.prod(self.pool) != self.block_size:
            raise ValueError(
                f"DraftConfig.pool {self.pool} holds {math.prod(self.pool)} tokens but block_size is "
                f"{self.block_size}: each pooled patch must be one kernel block"
            )
        check_range(self, "sparsity", 0.0, 1.0)
        if self.sparsity >= 1.0:
            raise ValueError(f"DraftConfig.sparsity must be < 1 (1 would drop every block), got {self.sparsity!r}")


@dataclass(frozen=True)
class _Geometry:
    """What depends only on the layout: built once per layout and device."""

    perm: torch.Tensor  # [N]: video tokens patch by patch, then text
    inv_perm: torch.Tensor
    video_blocks: int  # Mv: the first Mv blocks (after perm) are wholly video
    forced: torch.Tensor  # bool [M, M]: rows/columns of the other blocks, and the diagonal


@register
class Draft(Method):
    """Dynamic block selection from a pooled low-resolution attention map (see the module docstring)."""

    name = "draft"
    config_cls = DraftConfig
    dynamic = True

    def __init__(self, config: DraftConfig | None = None) -> None:
        super().__init__(config)
        self._geometries: dict[tuple, _Geometry] = {}

    def geometry(self, layout: TokenLayout, device: torch.device) -> _Geometry:
        """The layout's permutation and forced blocks (cached per layout, batch excluded, and device)."""
        key = (dataclasses.replace(layout, batch=1), device)
        geo = self._geometries.get(key)
        if geo is None:
            block = self.config.block_size
            tiled = layout.tile_permutation((1, *self.config.pool), device=device)
            v0 = layout.video_start
            video = tiled[v0 : v0 + layout.video_len]  # tile_permutation keeps text in place
            start, end = layout.text_range
            perm = torch.cat([video, torch.arange(start, end, device=device)])
            mv = layout.video_len // block
            m = num_blocks(layout.seq_len, block)
            other = torch.arange(m, device=device) >= mv
            geo = _Geometry(perm, torch.argsort(perm), mv, forced_blocks(other, diagonal=True))
            self._geometries[key] = geo
        return geo

    def density_hint(self, layout: TokenLayout) -> float:
        """Expected fraction of key blocks listed (host arithmetic): the kept draft share plus the dense other blocks
        (forced diagonal blocks are mostly among the kept ones and are not counted)."""
        block = self.config.block_size
        m, mv = num_blocks(layout.seq_len, block), layout.video_len // block
        kept = keep_count(1.0 - self.config.sparsity, mv * mv) if mv else 0
        return (kept + m * m - mv * mv) / (m * m)

    def draft_map(self, q: torch.Tensor, k: torch.Tensor, geo: _Geometry) -> torch.Tensor:
        """Float32 ``[B, H, Mv, Mv]``: softmax of the pooled scores (each row sums to 1)."""
        idx = geo.perm[: geo.video_blocks * self.config.block_size]
        pq = pool_blocks(q, self.config.block_size, idx)
        pk = pool_blocks(k, self.config.block_size, idx)
        return torch.softmax((pq @ pk.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        cfg = self.config
        geo = self.geometry(layout, q.device)
        b, h, n, _ = q.shape
        m, mv = geo.forced.shape[0], geo.video_blocks
        mask = geo.forced.expand(b, h, m, m).clone()
        if mv:
            keep = keep_count(1.0 - cfg.sparsity, mv * mv)
            mask[..., :mv, :mv] |= select_global(self.draft_map(q, k, geo), keep)
        return BlockPlan.from_block_mask(
            mask, n, cfg.block_size, perm=geo.perm, inv_perm=geo.inv_perm, density_hint=self.density_hint(layout)
        )
