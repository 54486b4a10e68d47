"""Procedural text-to-video data: moving coloured shapes with their captions.

Scenes are drawn from a seeded Python RNG (``sample_scenes``), so a seed always gives the same scene and
caption; ``render`` draws a batch of scenes as video with vectorised torch ops on any device (GPU for
training, CPU for tests). Nothing is read from or written to disk.

Caption grammar (one or two objects)::

    a <colour> <shape> moving <direction> <speed> [and a <colour> <shape> moving <direction> <speed>]
    on a <background> background
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

#: Object colours (RGB in [0, 1]); all far from every background colour.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.98),
    "yellow": (0.97, 0.90, 0.10),
    "purple": (0.62, 0.20, 0.88),
    "cyan": (0.10, 0.85, 0.92),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Unit motion vectors in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
#: Distance travelled over the whole clip, as a fraction of the frame size.
SPEEDS: dict[str, float] = {"slowly": 0.25, "quickly": 0.5}
#: Plain backgrounds (RGB).
PLAIN_BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.03, 0.03, 0.03),
    "gray": (0.40, 0.40, 0.40),
    "brown": (0.33, 0.21, 0.12),
}
#: Textured backgrounds: smooth patterns between two dark, near-grey tones.
TEXTURED_BACKGROUNDS: tuple[str, ...] = ("striped", "checkered")
BACKGROUNDS: tuple[str, ...] = tuple(PLAIN_BACKGROUNDS) + TEXTURED_BACKGROUNDS
_BG_KIND = {name: i for i, name in enumerate(BACKGROUNDS)}


@dataclass(frozen=True)
class ShapeSpec:
    """One moving object: what it is, where it is at mid-clip, and how it moves."""

    colour: str
    shape: str
    direction: str
    speed: str
    cx: float  # centre at mid-clip, fraction of width
    cy: float  # centre at mid-clip, fraction of height
    radius: float  # fraction of min(height, width)
    angle: float  # rotation of squares/triangles, radians


@dataclass(frozen=True)
class SceneSpec:
    """A full scene: one or two objects on a background."""

    objects: tuple[ShapeSpec, ...]
    background: str
    bg_tone_a: tuple[float, float, float]
    bg_tone_b: tuple[float, float, float]
    bg_period: float  # texture period, fraction of the frame size
    bg_angle: float  # stripe orientation, radians

    @property
    def caption(self) -> str:
        """The caption in the fixed grammar."""
        parts = [f"a {o.colour} {o.shape} moving {o.direction} {o.speed}" for o in self.objects]
        return " and ".join(parts) + f" on a {self.background} background"


def vocabulary() -> list[str]:
    """All words that captions can contain, in a fixed order."""
    words = ["a", "moving", "and", "on", "background"]
    words += list(COLOURS) + list(SHAPES) + list(DIRECTIONS) + list(SPEEDS) + list(BACKGROUNDS)
    return words


def sample_scene(rng: random.Random, two_prob: float = 0.3) -> SceneSpec:
    """Draw one scene from ``rng``; with probability ``two_prob`` it has two objects of different colours."""
    n = 2 if rng.random() < two_prob else 1
    colours = rng.sample(list(COLOURS), n)
    objects = []
    for k in range(n):
        direction = rng.choice(list(DIRECTIONS))
        speed = rng.choice(list(SPEEDS))
        dx, dy = DIRECTIONS[direction]
        if n == 2:  # two objects: put them in different halves across the motion axis where possible
            side = 0.3 if k == 0 else 0.7
            along, across = 0.5 + rng.uniform(-0.08, 0.08), side + rng.uniform(-0.05, 0.05)
        else:
            along, across = 0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.2, 0.2)
        cx, cy = (along, across) if dx != 0 else (across, along)
        objects.append(
            ShapeSpec(
                colour=colours[k],
                shape=rng.choice(SHAPES),
                direction=direction,
                speed=speed,
                cx=cx,
                cy=cy,
                radius=rng.uniform(0.09, 0.13) if n == 1 else rng.uniform(0.08, 0.11),
                angle=rng.uniform(-0.4, 0.4),
            )
        )
    background = rng.choice(BACKGROUNDS)
    if background in PLAIN_BACKGROUNDS:
        tone_a = tone_b = PLAIN_BACKGROUNDS[background]
    else:

        def tone() -> tuple[float, float, float]:
            g = rng.uniform(0.08, 0.40)
            return tuple(min(max(g + rng.uniform(-0.06, 0.06), 0.0), 1.0) for _ in range(3))  # type: ignore[return-value]

        tone_a, tone_b = tone(), tone()
    return SceneSpec(
        objects=tuple(objects),
        background=background,
        bg_tone_a=tone_a,
        bg_tone_b=tone_b,
        bg_period=rng.uniform(0.12, 0.3),
        bg_angle=rng.uniform(0.0, math.pi),
    )


def sample_scenes(seed: int, n: int, two_prob: float = 0.3) -> list[SceneSpec]:
    """``n`` scenes drawn deterministically from ``seed``."""
    rng = random.Random(seed)
    return [sample_scene(rng, two_prob) for _ in range(n)]


def _shape_coverage(
    px: torch.Tensor,
    py: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    r: torch.Tensor,
    ang: torch.Tensor,
    kind: torch.Tensor,
) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of circles (0), squares (1) or triangles (2), all in pixel units.

    ``px``/``py`` are (1, 1, H, W) pixel centres; the other arguments are (B, T, 1, 1).
    """
    x, y = px - cx, py - cy
    c, s = torch.cos(ang), torch.sin(ang)
    xr, yr = c * x + s * y, -s * x + c * y
    d_circle = torch.sqrt(x * x + y * y + 1e-6) - r
    half = r * 0.86
    d_square = torch.maximum(xr.abs(), yr.abs()) - half
    # equilateral triangle pointing up, circumradius ~1.15 r: max of three half-plane distances
    k = math.sqrt(3.0) / 2.0
    rt = r * 0.62
    d_tri = torch.maximum(torch.maximum(yr, k * xr - 0.5 * yr), -k * xr - 0.5 * yr) - rt
    d = torch.where(kind == 0, d_circle, torch.where(kind == 1, d_square, d_tri))
    return (0.5 - d).clamp(0.0, 1.0)


def render(
    scenes: list[SceneSpec], frames: int, height: int, width: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Render scenes as a video batch of shape (B, 3, frames, height, width) in [-1, 1], float32."""
    return render_with_coverage(scenes, frames, height, width, device)[0]


def render_with_coverage(
    scenes: list[SceneSpec], frames: int, height: int, width: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``render`` plus the objects' coverage (B, 1, frames, height, width) in [0, 1] (max over objects)."""
    dev = torch.device(device)
    b = len(scenes)
    f32 = dict(device=dev, dtype=torch.float32)
    size = float(min(height, width))
    ys = (torch.arange(height, **f32) + 0.5).view(1, 1, height, 1)
    xs = (torch.arange(width, **f32) + 0.5).view(1, 1, 1, width)
    # background (static over time): (B, 3, 1, H, W)
    tone_a = torch.tensor([s.bg_tone_a for s in scenes], **f32).view(b, 3, 1, 1, 1)
    tone_b = torch.tensor([s.bg_tone_b for s in scenes], **f32).view(b, 3, 1, 1, 1)
    kind = torch.tensor([_BG_KIND[s.background] for s in scenes], device=dev).view(b, 1, 1, 1, 1)
    period = torch.tensor([s.bg_period for s in scenes], **f32).view(b, 1, 1, 1, 1) * size
    ang = torch.tensor([s.bg_angle for s in scenes], **f32).view(b, 1, 1, 1, 1)
    u = torch.cos(ang) * xs.unsqueeze(1) + torch.sin(ang) * ys.unsqueeze(1)
    v = -torch.sin(ang) * xs.unsqueeze(1) + torch.cos(ang) * ys.unsqueeze(1)
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * u / period)
    checks = 0.5 + 0.5 * torch.sin(2 * math.pi * u / period) * torch.sin(2 * math.pi * v / period)
    n_plain = len(PLAIN_BACKGROUNDS)
    mix = torch.where(kind == n_plain, stripes, torch.where(kind == n_plain + 1, checks, torch.zeros_like(checks)))
    video = (tone_a * (1 - mix) + tone_b * mix).expand(b, 3, frames, height, width).clone()
    # objects, layer by layer (second object drawn over the first)
    tt = torch.arange(frames, **f32).view(1, frames, 1, 1)
    frac = (tt - (frames - 1) / 2) / max(frames - 1, 1)  # -0.5 .. 0.5
    coverage = torch.zeros(b, 1, frames, height, width, **f32)
    for layer in range(max(len(s.objects) for s in scenes)):

        def attr(fn, default: float = 0.0, layer: int = layer) -> torch.Tensor:
            vals = [fn(s.objects[layer]) if layer < len(s.objects) else default for s in scenes]
            return torch.tensor(vals, **f32).view(b, 1, 1, 1)

        present = attr(lambda o: 1.0)
        travel = attr(lambda o: SPEEDS[o.speed])
        cx = (attr(lambda o: o.cx) + attr(lambda o: DIRECTIONS[o.direction][0]) * travel * frac) * width
        cy = (attr(lambda o: o.cy) + attr(lambda o: DIRECTIONS[o.direction][1]) * travel * frac) * height
        r = attr(lambda o: o.radius) * size
        rot = attr(lambda o: o.angle)
        shp = attr(lambda o: float(SHAPES.index(o.shape)))
        cov = _shape_coverage(xs, ys, cx, cy, r, rot, shp) * present  # (B, T, H, W)
        rgb = torch.tensor(
            [COLOURS[s.objects[layer].colour] if layer < len(s.objects) else (0, 0, 0) for s in scenes], **f32
        ).view(b, 3, 1, 1, 1)
        cov = cov.unsqueeze(1)
        video = video * (1 - cov) + rgb * cov
        coverage = torch.maximum(coverage, cov)
    return video * 2 - 1, coverage


def batch(
    seed: int,
    n: int,
    frames: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    two_prob: float = 0.3,
) -> tuple[torch.Tensor, list[str]]:
    """``n`` seeded videos (B, 3, T, H, W) in [-1, 1] and their captions."""
    scenes = sample_scenes(seed, n, two_prob)
    return render(scenes, frames, height, width, device), [s.caption for s in scenes]
