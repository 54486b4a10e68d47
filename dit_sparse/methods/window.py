"""``window``: spatio-temporal local window at tile granularity (the STA / NATTEN family of baselines).

Video tokens are reordered into ``tile = (frames, rows, cols)`` tiles so that each tile is one kernel block
(Sliding Tile Attention, Zhang et al. 2025, §3); a query tile attends the key tiles whose bounding boxes lie within
``window`` tiles of its own along each axis. Text rows and columns are attended fully.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Method, MethodConfig, register
from dit_sparse.plan import BlockPlan, add_text
from dit_sparse.state import StepContext


@dataclass(frozen=True)
class WindowConfig(MethodConfig):
    """Hyper-parameters of ``window``.

    Attributes:
        tile: tile shape (frames, rows, cols) in tokens; its volume must equal ``block_size`` (default (2, 8, 8) = 128).
        window: neighbourhood half-width in tiles along (t, h, w) (default (1, 1, 1): a 3×3×3-tile neighbourhood,
            about 10% density at Wan2.1 480p).
    """

    tile: tuple[int, int, int] = (2, 8, 8)
    window: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.tile) < 1:
            raise ValueError(f"WindowConfig.tile must be three sizes >= 1, got {self.tile}")
        if min(self.window) < 0:
            raise ValueError(f"WindowConfig.window must be three half-widths >= 0, got {self.window}")
        if math.prod(self.tile) != self.block_size:
            raise ValueError(
                f"WindowConfig.tile {self.tile} holds {math.prod(self.tile)} tokens but block_size is "
                f"{self.block_size}: pick a tile whose volume is the block size"
            )


@register
class Window(Method):
    """Static spatio-temporal window over tiles."""

    name = "window"
    config_cls = WindowConfig

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        cfg = self.config
        perm = layout.tile_permutation(cfg.tile, device=q.device)
        mask = window_block_mask(layout, cfg.block_size, cfg.window, cfg.tile, perm, device=q.device)
        return BlockPlan.from_block_mask(mask, layout.seq_len, cfg.block_size, perm=perm)


def window_block_mask(
    layout: TokenLayout,
    block: int,
    window: tuple[int, int, int],
    unit: tuple[int, int, int] = (1, 1, 1),
    perm: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[M, M]`` block mask (blocks of ``block`` tokens after ``perm``): a block pair is kept when the
    ``unit``-cell index ranges of their video tokens lie within ``window`` cells of each other along (t, h, w).

    Text rows and columns are kept too. ``perm`` must keep text tokens in place (as ``tile_permutation`` does).
    """
    lo, hi, has_video = layout.block_extent(block, perm, device=device)
    # cell index ranges of each block, and the gap between two blocks' ranges along each axis
    cell = torch.tensor(unit, device=device)
    clo, chi = lo // cell, hi // cell
    gap = (clo[None, :, :] - chi[:, None, :]).clamp(min=0) + (clo[:, None, :] - chi[None, :, :]).clamp(min=0)
    near = (gap <= torch.tensor(window, device=device)).all(-1)
    mask = near & has_video[:, None] & has_video[None, :]
    return add_text(mask, layout, block, block)
