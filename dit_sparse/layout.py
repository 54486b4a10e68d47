"""Token layouts: where every token of a self-attention sequence sits in space (or among the text).

Built by the model-family adapter (``dit_sparse.pipelines``) or declared by the user (``apply(model, method,
layout=...)``) from the transformer's config and input shapes; methods read it and never guess shapes.

- :class:`TokenLayout`: a full grid. Video tokens are frame-major (``n = t·H·W + h·W + w``), which is the order every
  supported Diffusers video transformer produces after patchify. A dense 3D volume of ``D × H × W`` latent cells is
  ``TokenLayout(frames=D, height=H, width=W)`` (depth-major tokens): the frame axis is then the depth axis.
- :class:`VoxelLayout`: sparse voxels, one token per occupied cell at integer coordinates ``coords [N, 3]`` (any
  order). Its :meth:`VoxelLayout.tile_permutation` groups the tokens cell by cell, cells in Morton (Z-order) order,
  so that a run of consecutive tokens after the permutation (a kernel block) is a compact piece of space.

What works on which layout: methods that only read token coordinates (``dense``, ``window``, ``window3d``, ``ssa``,
``draft``, ``adaspa``) take both. ``radial``, ``rettention`` and ``svdit`` are frame-based (their patterns are defined
by frames and positions within a frame): on a dense volume they run with depth as the frame axis (an anisotropic
pattern; ``window3d`` and ``ssa`` are the isotropic 3D methods); on a VoxelLayout they raise :class:`LayoutError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch

TextWhere = Literal["prefix", "suffix", "none"]


class LayoutError(TypeError):
    """A method asked a layout for something it does not have (frames of a sparse-voxel layout)."""


def _check_text(text_len: int, text_where: str) -> None:
    if text_where not in ("prefix", "suffix", "none"):
        raise ValueError(f"text_where must be 'prefix', 'suffix' or 'none', got {text_where!r}")
    if (text_where == "none") != (text_len == 0):
        raise ValueError(
            f"text_len={text_len} does not fit text_where={text_where!r}: "
            "use text_where='none' exactly when no text tokens are joined to the video"
        )


class _Sequence:
    """What both layouts derive from ``video_len``, ``text_len``, ``text_where`` and ``video_coords`` (a mixin)."""

    video_len: int
    text_len: int
    text_where: TextWhere

    def video_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        """Length of the joint sequence the attention sees (video + text)."""
        return self.video_len + self.text_len

    @property
    def video_start(self) -> int:
        """Index of the first video token in the joint sequence."""
        return self.text_len if self.text_where == "prefix" else 0

    @property
    def text_range(self) -> tuple[int, int]:
        """``[start, end)`` of the text tokens in the joint sequence (empty when there is no text)."""
        if self.text_where == "prefix":
            return (0, self.text_len)
        if self.text_where == "suffix":
            return (self.video_len, self.seq_len)
        return (self.seq_len, self.seq_len)

    def is_text(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[seq_len]``: True where the token is a text token."""
        idx = torch.arange(self.seq_len, device=device)
        start, end = self.text_range
        return (idx >= start) & (idx < end)

    def _with_text(self, video_order: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
        """The joint-sequence permutation from an order of the video tokens (text tokens keep their place)."""
        parts = []
        start, end = self.text_range
        if self.text_where == "prefix":
            parts.append(torch.arange(start, end, device=device))
        parts.append(video_order + self.video_start)
        if self.text_where == "suffix":
            parts.append(torch.arange(start, end, device=device))
        return torch.cat(parts)

    def block_extent(
        self, block: int, perm: torch.Tensor | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bounding box of the video tokens of each block of ``block`` consecutive tokens (after ``perm``).

        Returns ``lo, hi`` (int64 ``[M, 3]``, the min and max coordinates over the block's video tokens) and
        ``has_video`` (bool ``[M]``; blocks of text only have ``lo > hi``).
        """
        n = self.seq_len
        m = -(-n // block)
        coords = torch.full((n, 3), -1, dtype=torch.long, device=device)
        start = self.video_start
        coords[start : start + self.video_len] = self.video_coords(device)
        if perm is not None:
            coords = coords[perm.to(coords.device)]
        is_video = coords[:, 0] >= 0
        block_id = (torch.arange(n, device=device) // block).unsqueeze(1).expand(n, 3)
        big = torch.iinfo(torch.long).max
        lo = torch.full((m, 3), big, dtype=torch.long, device=device)
        hi = torch.full((m, 3), -1, dtype=torch.long, device=device)
        lo.scatter_reduce_(0, block_id, torch.where(is_video[:, None], coords, big), reduce="amin")
        hi.scatter_reduce_(0, block_id, coords, reduce="amax")
        has_video = hi[:, 0] >= 0
        return lo, hi, has_video


@dataclass(frozen=True)
class TokenLayout(_Sequence):
    """Token grid of one self-attention call (a video, or a dense 3D volume with ``frames`` = depth).

    Attributes:
        frames, height, width: video tokens per axis after patchify (T, H, W).
        text_len: number of text tokens joined to the video tokens (0 for cross-attention-only models).
        text_where: ``"prefix"`` (CogVideoX: text first), ``"suffix"`` (HunyuanVideo, Mochi: text last) or
            ``"none"`` (Wan, LTX, SkyReels, Cosmos: text only reaches the video through cross-attention).
        batch: batch size of the attention call (a batched CFG pass counts both halves).
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_where: TextWhere = "none"
    batch: int = 1

    def __post_init__(self) -> None:
        if min(self.frames, self.height, self.width) < 1:
            raise ValueError(f"TokenLayout needs frames, height, width >= 1, got {self.grid}")
        _check_text(self.text_len, self.text_where)

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width

    def video_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(t, h, w) of every video token, shape ``[video_len, 3]`` (int64), in sequence order."""
        t, h, w = torch.meshgrid(
            torch.arange(self.frames, device=device),
            torch.arange(self.height, device=device),
            torch.arange(self.width, device=device),
            indexing="ij",
        )
        return torch.stack([t.flatten(), h.flatten(), w.flatten()], dim=1)

    def tile_permutation(self, tile: tuple[int, int, int], device: torch.device | str | None = None) -> torch.Tensor:
        """Permutation ``perm`` of the joint sequence that makes each ``(tt, th, tw)`` tile of video tokens contiguous.

        ``x[:, perm]`` lists the tiles in frame-major tile order, the tokens inside each tile frame-major too;
        text tokens keep their place (before or after the video). Tiles at the grid edges are smaller where the
        grid is not a multiple of the tile. ``torch.argsort(perm)`` restores the order.
        """
        tt, th, tw = tile
        if min(tile) < 1:
            raise ValueError(f"tile sizes must be >= 1, got {tile}")
        coords = self.video_coords(device)
        t, h, w = coords.unbind(1)
        nh, nw = -(-self.height // th), -(-self.width // tw)
        tile_id = ((t // tt) * nh + (h // th)) * nw + (w // tw)
        inner = ((t % tt) * th + (h % th)) * tw + (w % tw)
        key = tile_id * (tt * th * tw) + inner
        return self._with_text(torch.argsort(key, stable=True), device)


def morton3d(coords: torch.Tensor) -> torch.Tensor:
    """Morton (Z-order) code of non-negative integer coordinates ``[N, 3]`` (each < 2**21), int64 ``[N]``."""
    x = coords.long()
    if x.numel() and bool((x < 0).any() | (x >= 1 << 21).any()):
        raise ValueError("morton3d needs coordinates in [0, 2**21)")
    out = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for axis in range(3):
        v = x[:, axis]
        for shift, mask in ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F),
                            (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249)):  # fmt: skip
            v = (v | (v << shift)) & mask
        out |= v << (2 - axis)
    return out


@dataclass(frozen=True, eq=False)
class VoxelLayout(_Sequence):
    """Sparse voxels of one self-attention call: one token per occupied cell, at integer coordinates.

    Attributes:
        coords: int64 ``[N, 3]`` coordinates of the voxel tokens, in the model's token order (any order; each
            cell at most once is expected but not checked). Kept as given (its device is the caller's).
        resolution: the grid the coordinates lie in (default None: ``coords.max(0) + 1``, read once here, and the
            coordinates checked to be >= 0; a given resolution is taken as it is, so that ``dataclasses.replace``
            costs no device read).
        text_len, text_where, batch: as in :class:`TokenLayout`.
        digest: content digest of ``coords`` (leave None: filled in on first use).

    Equality and hashing go by the coordinates' content (a digest computed on first use and kept, also by
    ``dataclasses.replace``), so a layout can key the plan caches. Frame properties (``frames``, ``height``, ``width``,
    ``tokens_per_frame``, ``grid``) raise :class:`LayoutError`: a sparse voxel set has no frames.
    """

    coords: torch.Tensor
    resolution: tuple[int, int, int] | None = None
    text_len: int = 0
    text_where: TextWhere = "none"
    batch: int = 1
    digest: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        c = self.coords
        if c.dim() != 2 or c.shape[1] != 3 or c.shape[0] < 1:
            raise ValueError(f"VoxelLayout.coords must be an integer tensor [N >= 1, 3], got {tuple(c.shape)}")
        if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise ValueError(f"VoxelLayout.coords must hold integers, got {c.dtype}")
        if c.dtype != torch.long:
            object.__setattr__(self, "coords", c.long())
        if self.resolution is None:
            if bool((self.coords < 0).any()):
                raise ValueError("VoxelLayout.coords must be >= 0 (shift them into the grid)")
            object.__setattr__(self, "resolution", tuple(int(v) + 1 for v in self.coords.max(0).values))
        elif len(self.resolution) != 3 or min(self.resolution) < 1:
            raise ValueError(f"VoxelLayout.resolution must be three sizes >= 1, got {self.resolution}")
        _check_text(self.text_len, self.text_where)

    # ------------------------------------------------------------ identity
    def _digest(self) -> str:
        if self.digest is None:
            data = self.coords.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
            object.__setattr__(self, "digest", hashlib.blake2b(data, digest_size=16).hexdigest())
        return self.digest  # type: ignore[return-value]

    def _key(self) -> tuple:
        return (self.video_len, self.resolution, self.text_len, self.text_where, self.batch, self._digest())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VoxelLayout):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ------------------------------------------------------------ geometry
    @property
    def video_len(self) -> int:
        """Number of voxel tokens (the layout's non-text tokens)."""
        return self.coords.shape[0]

    def video_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Coordinates of every voxel token, ``[video_len, 3]`` (int64), in sequence order."""
        return self.coords.to(device) if device is not None else self.coords

    def tile_permutation(self, tile: tuple[int, int, int], device: torch.device | str | None = None) -> torch.Tensor:
        """Permutation ``perm`` of the joint sequence that makes the voxels of each ``tile``-sized cell contiguous.

        Cells are listed in Morton (Z-order) order of their cell coordinates, the voxels inside a cell in raster
        order, so consecutive tokens after the permutation stay close in space; ``tile = (1, 1, 1)`` is the Morton
        order of the voxels. Text tokens keep their place; ``torch.argsort(perm)`` restores the model's order.
        """
        if len(tile) != 3 or min(tile) < 1:
            raise ValueError(f"tile must be three sizes >= 1, got {tile}")
        c = self.video_coords(device)
        size = torch.tensor(tile, device=c.device)
        inner = c % size
        inner_id = (inner[:, 0] * tile[1] + inner[:, 1]) * tile[2] + inner[:, 2]
        key = morton3d(c // size) * (tile[0] * tile[1] * tile[2]) + inner_id
        return self._with_text(torch.argsort(key, stable=True), device)

    # ------------------------------------------------------------ no frames
    def _no_frames(self, what: str) -> LayoutError:
        return LayoutError(
            f"a VoxelLayout has no {what}: this method is frame-based (radial, rettention and svdit need a frame "
            "grid); on sparse voxels use dense, window, window3d, ssa, draft or adaspa, or declare a dense volume "
            "as TokenLayout(frames=D, height=H, width=W)"
        )

    @property
    def frames(self) -> int:
        raise self._no_frames("frames")

    @property
    def height(self) -> int:
        raise self._no_frames("height")

    @property
    def width(self) -> int:
        raise self._no_frames("width")

    @property
    def tokens_per_frame(self) -> int:
        raise self._no_frames("tokens_per_frame")

    @property
    def grid(self) -> tuple[int, int, int]:
        raise self._no_frames("frame grid")


Layout = TokenLayout | VoxelLayout
"""Either layout: what a method's ``plan`` receives."""
