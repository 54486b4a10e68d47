"""``window3d``: an isotropic local window over the three axes of a dense volume or a set of sparse voxels.

Tokens are grouped into ``cell``-sized cubes (``layout.tile_permutation(cell)``: raster cell order on a dense
:class:`~dit_sparse.layout.TokenLayout` volume, Morton order on a :class:`~dit_sparse.layout.VoxelLayout`), so that a
kernel block of ``block_size`` consecutive tokens is a compact piece of space. A query block attends every key block
whose bounding box lies within ``window`` cells of its own along each axis (Chebyshev distance between the boxes,
in voxel units): every query token sees at least its ``±window`` neighbourhood, at block granularity. Text rows and
columns are attended fully.

Unlike ``window`` (video: tiles of frames × rows × cols, a window counted in tiles), the window here is counted in
cells of the grid and is the same along the three axes by default. On sparse voxels a block covers as many cells
as it takes to hold ``block_size`` occupied ones, so the same window keeps fewer tokens per query than on a dense
volume: the pattern follows the occupied surface.

Defaults: ``block_size = 64`` with ``cell = (4, 4, 4)`` (a dense block is one 4³ cube, Direct3D-S2's compression block),
``window = (4, 4, 4)`` (a ±4-cell neighbourhood, the extent of Direct3D-S2's 8³ attention window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_sparse.layout import Layout
from dit_sparse.methods.base import Method, MethodConfig, register
from dit_sparse.methods.window import window_block_mask
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext


@dataclass(frozen=True)
class Window3dConfig(MethodConfig):
    """Hyper-parameters of ``window3d``.

    Attributes:
        block_size: kernel block size in tokens (default 64 = one 4³ cell of a dense volume).
        cell: grouping cube (depth, height, width) in grid cells (default (4, 4, 4)).
        window: neighbourhood half-width in grid cells along each axis (default (4, 4, 4)).
    """

    block_size: int = 64
    cell: tuple[int, int, int] = (4, 4, 4)
    window: tuple[int, int, int] = (4, 4, 4)

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.cell) < 1:
            raise ValueError(f"Window3dConfig.cell must be three sizes >= 1, got {self.cell}")
        if min(self.window) < 0:
            raise ValueError(f"Window3dConfig.window must be three half-widths >= 0, got {self.window}")


@register
class Window3d(Method):
    """Static isotropic 3D window over spatially grouped blocks (dense volumes and sparse voxels)."""

    name = "window3d"
    config_cls = Window3dConfig

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, ctx: StepContext) -> BlockPlan:
        cfg = self.config
        perm = layout.tile_permutation(cfg.cell, device=q.device)
        mask = window_block_mask(layout, cfg.block_size, cfg.window, perm=perm, device=q.device)
        return BlockPlan.from_block_mask(mask, layout.seq_len, cfg.block_size, perm=perm)
