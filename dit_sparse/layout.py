"""TokenLayout: where every token of a self-attention sequence sits in the video (or among the text).

Built by the model-family adapter (``dit_sparse.pipelines``) from the transformer's config and input shapes;
methods read it and never guess shapes. Video tokens are frame-major (``n = t·H·W + h·W + w``), which is the
order every supported Diffusers video transformer produces after patchify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TextWhere = Literal["prefix", "suffix", "none"]


@dataclass(frozen=True)
class TokenLayout:
    """Token grid of one self-attention call.

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
        if self.text_where not in ("prefix", "suffix", "none"):
            raise ValueError(f"text_where must be 'prefix', 'suffix' or 'none', got {self.text_where!r}")
        if (self.text_where == "none") != (self.text_len == 0):
            raise ValueError(
                f"text_len={self.text_len} does not fit text_where={self.text_where!r}: "
                "use text_where='none' exactly when no text tokens are joined to the video"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width

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

    def video_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(t, h, w) of every video token, shape ``[video_len, 3]`` (int64), in sequence order."""
        t, h, w = torch.meshgrid(
            torch.arange(self.frames, device=device),
            torch.arange(self.height, device=device),
            torch.arange(self.width, device=device),
            indexing="ij",
        )
        return torch.stack([t.flatten(), h.flatten(), w.flatten()], dim=1)

    def is_text(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[seq_len]``: True where the token is a text token."""
        idx = torch.arange(self.seq_len, device=device)
        start, end = self.text_range
        return (idx >= start) & (idx < end)

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
        video_perm = torch.argsort(key, stable=True) + self.video_start
        parts = []
        start, end = self.text_range
        if self.text_where == "prefix":
            parts.append(torch.arange(start, end, device=device))
        parts.append(video_perm)
        if self.text_where == "suffix":
            parts.append(torch.arange(start, end, device=device))
        return torch.cat(parts)

    def block_extent(
        self, block: int, perm: torch.Tensor | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bounding box of the video tokens of each block of ``block`` consecutive tokens (after ``perm``).

        Returns ``lo, hi`` (int64 ``[M, 3]``, the min and max (t, h, w) over the block's video tokens) and
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
