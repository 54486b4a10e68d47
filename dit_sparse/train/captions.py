"""Automatic caption check: does a video show the colours and motion directions its caption names?

For each object named in the caption, pixels whose nearest palette colour is the object's colour are
tracked frame by frame; a least-squares line through their centroids gives the motion over the clip,
which must point in the named direction (the closest of the named directions) and be long enough.
The same code checks the training data (tests) and generated videos (model card).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import COLOURS, DIRECTIONS, PLAIN_BACKGROUNDS, SHAPES, SPEEDS

_PALETTE_NAMES = list(COLOURS) + list(PLAIN_BACKGROUNDS)
_PALETTE = np.array([COLOURS.get(n, PLAIN_BACKGROUNDS.get(n)) for n in _PALETTE_NAMES], dtype=np.float32)
_OBJ_RE = re.compile(
    r"(?P<colour>{})\s+(?P<shape>{})\s+moving\s+(?P<direction>{})(?:\s+(?P<speed>{}))?".format(
        "|".join(COLOURS), "|".join(SHAPES), "|".join(DIRECTIONS), "|".join(SPEEDS)
    )
)


@dataclass
class ObjectCheck:
    """Result for one object of a caption."""

    colour: str
    direction: str
    found_frames: float  # fraction of frames where the colour was seen
    motion: tuple[float, float]  # (dx, dy) over the clip, in fractions of the frame size
    detected_direction: str | None
    ok: bool


@dataclass
class CaptionCheck:
    """Result for a whole caption: ``ok`` when every named object passes."""

    caption: str
    objects: list[ObjectCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the caption names at least one object and every one passes."""
        return bool(self.objects) and all(o.ok for o in self.objects)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """The (colour, direction) pairs that a caption names, in order."""
    return [(m["colour"], m["direction"]) for m in _OBJ_RE.finditer(caption.lower())]


def _to_thwc(video: np.ndarray | torch.Tensor) -> np.ndarray:
    """Accept (T, H, W, 3) in [0, 1] or (3, T, H, W) in [-1, 1]; return (T, H, W, 3) float32 in [0, 1]."""
    if isinstance(video, torch.Tensor):
        if video.ndim == 4 and video.shape[0] == 3 and video.shape[-1] != 3:
            video = ((video.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video, dtype=np.float32)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a (T, H, W, 3) video, got {video.shape}")
    return video


def check_video(
    video: np.ndarray | torch.Tensor,
    caption: str,
    max_dist: float = 0.3,
    min_travel: float = 0.08,
    min_found: float = 0.5,
) -> CaptionCheck:
    """Check one video against its caption (see the module docstring)."""
    v = _to_thwc(video)
    while v.shape[1] >= 96 and v.shape[2] >= 96:  # centroids need no full resolution: 4x less work
        v = v[:, ::2, ::2]
    t, h, w, _ = v.shape
    d2 = ((v[..., None, :] - _PALETTE) ** 2).sum(-1)  # (T, H, W, P)
    nearest = d2.argmin(-1)
    close = np.sqrt(d2.min(-1)) < max_dist
    min_area = max(4.0, 0.0015 * h * w)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    result = CaptionCheck(caption)
    for colour, direction in parse_caption(caption):
        mask = (nearest == _PALETTE_NAMES.index(colour)) & close
        area = mask.sum((1, 2)).astype(np.float32)
        valid = area >= min_area
        found = float(valid.mean())
        motion = (0.0, 0.0)
        detected = None
        if valid.sum() >= max(2, int(min_found * t)) and found >= min_found:
            cx = (mask * xs).sum((1, 2))[valid] / area[valid]
            cy = (mask * ys).sum((1, 2))[valid] / area[valid]
            tt = np.arange(t, dtype=np.float32)[valid]
            tc = tt - tt.mean()
            denom = float((tc * tc).sum()) or 1.0
            sx = float((tc * (cx - cx.mean())).sum()) / denom
            sy = float((tc * (cy - cy.mean())).sum()) / denom
            motion = (sx * (t - 1) / w, sy * (t - 1) / h)
            if np.hypot(*motion) >= min_travel:
                detected = max(DIRECTIONS, key=lambda n: motion[0] * DIRECTIONS[n][0] + motion[1] * DIRECTIONS[n][1])
        result.objects.append(ObjectCheck(colour, direction, found, motion, detected, ok=detected == direction))
    return result


def agreement(videos: list[np.ndarray | torch.Tensor] | np.ndarray, captions: list[str]) -> float:
    """Fraction of (video, caption) pairs whose check passes."""
    checks = [check_video(v, c) for v, c in zip(videos, captions, strict=True)]
    return sum(c.ok for c in checks) / max(len(checks), 1)
