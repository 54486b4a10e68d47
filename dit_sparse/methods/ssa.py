"""``ssa``: Spatial Sparse Attention (Direct3D-S2, Wu et al. 2025, §3.2), training-free, on the BlockPlan kernel.

Tokens are grouped into spatial blocks as in ``window3d`` (``layout.tile_permutation(cell)``; Morton-ordered cells on
sparse voxels), one kernel block of ``block_size`` tokens being one SSA block. Per call, per sample and head:

1. block compression: each key block is mean-pooled into one compressed key ``k̄`` (float32);
2. block selection: every query token's softmax over the compressed keys, ``softmax(q k̄ᵀ / √D)``, averaged over
   the query block, scores the key blocks; each query block keeps its ``topk`` best;
3. the local window: the key blocks within ``window`` cells of the query block (the ``window3d`` rule);
4. combination: one exact softmax over the union of the selected and window blocks (one kernel call). Text rows and
   columns are attended fully.

What is training-free here and what needs a model trained with SSA. The official module (zenmediasocial/Direct3D-S2,
``modules/sparse/attention/spatial_sparse_attention``) compresses keys and values with a learned sparse-convolution
block plus a learned intra-block position embedding, and returns ``g_c·O_compressed + g_s·O_selected + g_w·O_window``:
three separately normalised branches mixed by per-token gates from a learned linear layer on the block's input. Those
weights exist only in a model trained with SSA, and an attention call (q, k, v) does not carry them, so this version
keeps what needs no training: compression by mean pooling (it only ranks blocks), top-k selection from the
compressed scores, the window, and their combination as a union under one softmax (with a dense-trained model this
is exact attention restricted to the kept blocks). The compressed branch's output and the gates are not computed.

Official defaults (``sparse_dit.py``): compression blocks of 4³ cells, selection blocks of 8³ cells, top-8 selection
blocks, windows of 8³ cells shifted by 4 on every other layer, 2 key/value heads shared by the query heads.
Deviations: the selection block is the compression block, one kernel block of ``block_size`` tokens (default 64:
one 4³ cell of a dense volume), and ``topk = 16`` such blocks (about the tokens of 8 selection blocks on a voxel
surface); the window is a ±4-cell neighbourhood of the query block (the extent of the 8³ window, centred instead of
a shifted partition); top-k is per query block (the official kernel selects per query token) and per head (no
grouped key/value heads in our calls); the score uses the ``1/√D`` scale (methods are not handed the call's scale).

Cost per call beyond the sparse attention: one gather of k (the block means), the compressed scores and one ``topk``
per query block; no device->host sync (the plan carries a ``density_hint``). The scores
(:mod:`dit_sparse.kernels.compressed_scores`) are one fused Triton launch on CUDA: the ``N × M`` probabilities are
reduced per query block in registers and only the ``[B, H, M, M]`` scores reach memory (the torch reference on
other devices computes them in head chunks of bounded memory).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dit_sparse.kernels.compressed_scores import compressed_scores
from dit_sparse.layout import Layout
from dit_sparse.methods.base import Method, MethodConfig, register
from dit_sparse.methods.selection import forced_blocks, text_blocks
from dit_sparse.methods.window import window_block_mask
from dit_sparse.plan import BlockPlan, num_blocks
from dit_sparse.state import StepContext


@dataclass(frozen=True)
class SsaConfig(MethodConfig):
    """Hyper-parameters of ``ssa`` (see the module docstring for the official values and the deviations).

    Attributes:
        block_size: tokens per SSA block = kernel block (default 64).
        cell: grouping cube in grid cells (default (4, 4, 4)).
        topk: key blocks selected per query block from the compressed scores (default 16).
        window: local window half-width in grid cells along each axis (default (4, 4, 4)).
    """

    block_size: int = 64
    cell: tuple[int, int, int] = (4, 4, 4)
    topk: int = 16
    window: tuple[int, int, int] = (4, 4, 4)

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.cell) < 1:
            raise ValueError(f"SsaConfig.cell must be three sizes >= 1, got {self.cell}")
        if self.topk < 1:
            raise ValueError(f"SsaConfig.topk must be >= 1, got {self.topk!r}")
        if min(self.window) < 0:
            raise ValueError(f"SsaConfig.window must be three half-widths >= 0, got {self.window}")


@dataclass(frozen=True)
class _Geometry:
    """What depends only on the layout: built once per layout and device."""

    perm: torch.Tensor  # [N]: tokens cell by cell
    inv_perm: torch.Tensor
    counts: torch.Tensor  # float32 [M]: tokens per block (the last one may be partial)
    fixed: torch.Tensor  # bool [M, M]: the window, text rows and columns, and the diagonal
    text: torch.Tensor  # bool [M]: blocks holding a text token (their rows and columns are always full)
    fixed_density: float  # fraction of block pairs in ``fixed`` (host value, read once per layout)


def block_means(x: torch.Tensor, block: int, perm: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Float32 mean of ``x[:, :, perm]`` (``[B, H, N, D]``) over each block of ``block`` tokens, the partial last block
    included: ``[B, H, M, D]``."""
    b, h, n, d = x.shape
    m = counts.numel()
    padded = x.new_zeros(b, h, m * block, d)
    padded[:, :, :n] = x.index_select(2, perm)
    return padded.view(b, h, m, block, d).sum(3, dtype=torch.float32) / counts[:, None]


@register
class Ssa(Method):
    """Dynamic spatial sparse attention: compressed-score top-k blocks plus the 3D window (see the module docstring)."""

    name = "ssa"
    config_cls = SsaConfig
    dynamic = True

    def __init__(self, config: SsaConfig | None = None) -> None:
        super().__init__(config)
        self._geometries: dict[tuple, _Geometry] = {}

    def geometry(self, layout: Layout, device: torch.device) -> _Geometry:
        """The layout's permutation, block sizes and fixed blocks (cached per layout, batch excluded, and device)."""
        key = (dataclasses.replace(layout, batch=1), device)
        geo = self._geometries.get(key)
        if geo is None:
            cfg = self.config
            block, n = cfg.block_size, layout.seq_len
            perm = layout.tile_permutation(cfg.cell, device=device)
            m = num_blocks(n, block)
            counts = torch.full((m,), float(block), device=device)
            counts[-1] = n - block * (m - 1)
            text = text_blocks(layout, block, perm)
            fixed = window_block_mask(layout, block, cfg.window, perm=perm, device=device) | forced_blocks(text)
            geo = _Geometry(perm, torch.argsort(perm), counts, fixed, text, float(fixed.float().mean()))
            self._geometries[key] = geo
        return geo

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, ctx: StepContext) -> BlockPlan:
        cfg = self.config
        geo = self.geometry(layout, q.device)
        b, h, n, _ = q.shape
        m = geo.counts.numel()
        scores = compressed_scores(
            q, block_means(k, cfg.block_size, geo.perm, geo.counts), cfg.block_size, geo.perm, geo.counts
        )
        top = min(cfg.topk, m)
        # the fixed blocks plus the top-k in one [B, H, M, M] mask (no separate selection mask to OR in)
        mask = geo.fixed.expand(b, h, m, m).clone(memory_format=torch.contiguous_format)
        mask.scatter_(-1, scores.topk(top, dim=-1, sorted=False).indices, True)
        hint = min(1.0, geo.fixed_density + top / m)
        return BlockPlan.from_block_mask(
            mask, n, cfg.block_size, perm=geo.perm, inv_perm=geo.inv_perm, density_hint=hint
        )
