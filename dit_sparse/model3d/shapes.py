"""Procedural 3D shapes with captions from a small grammar, as truncated signed distance volumes.

Caption grammar (one object)::

    a <size> <shape> [at the <place>]

with sizes ``small`` / ``large``, shapes ``sphere``, ``cube``, ``cylinder``, ``cone`` and places ``left``, ``right``,
``top``, ``bottom``, ``front``, ``back`` (small objects only; an object without a place sits in the centre). Axes of a
volume ``[D, H, W]``: depth = front (low) to back, height = bottom (low) to top, width = left (low) to right.
A seed always gives the same shapes (``sample``); everything is computed with vectorised torch ops, nothing is read
from or written to disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

RES = 16
"""Cells per axis of the volume."""
TRUNCATION = 0.25
"""Signed distances (in units of the half-extent of the volume) are divided by this and clamped to [-1, 1]."""
SIZES: dict[str, float] = {"small": 0.3, "large": 0.6}
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone")
PLACES: dict[str, tuple[float, float, float]] = {  # (depth, height, width) offsets
    "left": (0.0, 0.0, -0.45),
    "right": (0.0, 0.0, 0.45),
    "bottom": (0.0, -0.45, 0.0),
    "top": (0.0, 0.45, 0.0),
    "front": (-0.45, 0.0, 0.0),
    "back": (0.45, 0.0, 0.0),
}


def vocabulary() -> list[str]:
    """Every word of the grammar, in a fixed order (the text embedding's rows after the padding row)."""
    return ["a", "at", "the", *SIZES, *SHAPES, *PLACES]


@dataclass(frozen=True)
class Shape:
    """One object: its shape, size, place (None: the centre) and the caption naming them."""

    shape: str
    size: str
    place: str | None

    @property
    def caption(self) -> str:
        where = f" at the {self.place}" if self.place else ""
        return f"a {self.size} {self.shape}{where}"


def sample(seed: int, n: int) -> list[Shape]:
    """``n`` shapes drawn from a seeded RNG (small objects get a place with probability 6/7)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.choice(list(SIZES))
        place = rng.choice([None, *PLACES]) if size == "small" else None
        out.append(Shape(rng.choice(SHAPES), size, place))
    return out


def parse(caption: str) -> Shape:
    """The shape a caption of the grammar names; ValueError (with the grammar) for anything else."""
    words = caption.strip().lower().split()
    ok = len(words) in (3, 6) and words[0] == "a" and words[1] in SIZES and words[2] in SHAPES
    if ok and len(words) == 6:
        ok = words[3:5] == ["at", "the"] and words[5] in PLACES
    if not ok:
        raise ValueError(
            f"prompt {caption!r} is not in the tiny 3D model's grammar: 'a <size> <shape> [at the <place>]' with size "
            f"{'/'.join(SIZES)}, shape {'/'.join(SHAPES)}, place {'/'.join(PLACES)}"
        )
    return Shape(words[2], words[1], words[5] if len(words) == 6 else None)


def grid(res: int = RES, device: torch.device | str | None = None) -> torch.Tensor:
    """Cell centres in [-1, 1], ``[res, res, res, 3]`` (depth, height, width)."""
    axis = (torch.arange(res, device=device, dtype=torch.float32) + 0.5) / res * 2 - 1
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)


def sdf(shapes: list[Shape], res: int = RES, device: torch.device | str | None = None) -> torch.Tensor:
    """Truncated, normalised signed distances ``[B, 1, res, res, res]`` in [-1, 1] (negative inside)."""
    p = grid(res, device)[None]  # [1, R, R, R, 3]
    centre = torch.tensor([PLACES[s.place] if s.place else (0.0, 0.0, 0.0) for s in shapes], device=device)
    r = torch.tensor([SIZES[s.size] for s in shapes], device=device).view(-1, 1, 1, 1)
    x = p - centre.view(-1, 1, 1, 1, 3)
    d, h, w = x.unbind(-1)
    radial = torch.sqrt(d**2 + w**2)  # distance from the vertical (height) axis
    sphere = x.norm(dim=-1) - r
    q = x.abs() - r[..., None] * 0.8
    cube = q.clamp(min=0).norm(dim=-1) + q.max(-1).values.clamp(max=0)
    cyl_q = torch.stack([radial - r * 0.8, h.abs() - r], -1)
    cylinder = cyl_q.clamp(min=0).norm(dim=-1) + cyl_q.max(-1).values.clamp(max=0)
    # cone: apex at the top (h = r), base of radius r at h = -r; a bounded approximation of the distance
    cone = torch.maximum((radial - (r - h) / 2) / 1.118, h.abs() - r)
    all_ = torch.stack([sphere, cube, cylinder, cone], 1)
    index = torch.tensor([SHAPES.index(s.shape) for s in shapes], device=device).view(-1, 1, 1, 1, 1)
    chosen = all_.gather(1, index.expand(-1, 1, res, res, res))
    return (chosen / TRUNCATION).clamp(-1, 1)
