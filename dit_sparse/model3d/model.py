"""TinyDiT3D: a small text-to-3D diffusion transformer over an SDF volume, and its checkpoint folder.

The volume ``[B, 1, 16, 16, 16]`` is cut into 2³ patches (an 8 × 8 × 8 grid of 512 tokens, depth-major: the token
layout is ``TokenLayout(frames=8, height=8, width=8)``), embedded with a learned position embedding, and run through
DiT blocks (adaLN-Zero modulation from the timestep and the prompt). The prompt is a bag of words of the shape
grammar (:mod:`dit_sparse.model3d.shapes`), embedded by a small learned table (no text encoder, no download). Each
block's self-attention calls ``F.scaled_dot_product_attention`` on ``[B, heads, 512, head_dim]``, which is what
``dit_sparse.apply(model, method, layout=model.token_layout())`` makes sparse.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dit_sparse.layout import TokenLayout

from .shapes import RES, vocabulary

ASSET = Path(__file__).resolve().parent.parent / "assets" / "tiny-3d"
"""The embedded model's folder in a source checkout (``assets/tiny-3d``); :func:`asset_path` finds it installed too."""


def asset_path() -> Path:
    """The embedded tiny 3D model's folder (source tree or installed wheel)."""
    for path in (ASSET, Path(__file__).resolve().parents[2] / "assets" / "tiny-3d"):
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"the tiny 3D model is missing (looked for {ASSET}/config.json): reinstall dit-sparse")


@dataclass(frozen=True)
class Config3d:
    """Architecture (defaults: the embedded model). ``res`` cells per axis, ``patch`` cells per token per axis."""

    res: int = RES
    patch: int = 2
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp: int = 4
    max_words: int = 6

    @property
    def grid(self) -> int:
        return self.res // self.patch


def timestep_embedding(s: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the flow time ``s`` in [0, 1] (scaled by 1000), ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
    angles = (s.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], -1)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (the call dit_sparse intercepts)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """DiT block with adaLN-Zero modulation."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp * width), nn.GELU(approximate="tanh"), nn.Linear(mlp * width, width)
        )
        self.mod = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, g1, s2, b2, g2 = self.mod(F.silu(c))[:, None].chunk(6, -1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + s1) + b1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


class TinyDiT3D(nn.Module):
    """Predicts the flow velocity ``noise - x0`` of an SDF volume at flow time ``s`` for a prompt's word ids."""

    def __init__(self, config: Config3d | None = None) -> None:
        super().__init__()
        cfg = self.config = config or Config3d()
        w, p = cfg.width, cfg.patch
        self.words = vocabulary()
        self.patch_in = nn.Linear(p**3, w)
        self.pos = nn.Parameter(torch.randn(cfg.grid**3, w) * 0.02)
        self.time = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.text = nn.Embedding(len(self.words) + 1, w, padding_idx=0)  # row 0: padding (and the empty prompt)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mod_out = nn.Linear(w, 2 * w)
        self.patch_out = nn.Linear(w, p**3)
        for layer in (self.mod_out, self.patch_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def token_layout(self, batch: int = 1) -> TokenLayout:
        """The token grid of the self-attention calls (depth-major 8 × 8 × 8 for the default config)."""
        g = self.config.grid
        return TokenLayout(frames=g, height=g, width=g, batch=batch)

    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Word ids ``[B, max_words]`` (0 = padding; an empty prompt is all padding). Unknown words: ValueError."""
        index = {word: i + 1 for i, word in enumerate(self.words)}
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            unknown = [word for word in words if word not in index]
            if unknown or len(words) > self.config.max_words:
                raise ValueError(f"prompt {prompt!r}: unknown words {unknown} or over {self.config.max_words} words")
            rows.append([index[word] for word in words] + [0] * (self.config.max_words - len(words)))
        return torch.tensor(rows, dtype=torch.long, device=device)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g = x.shape[0], self.config.patch, self.config.grid
        x = x.view(b, g, p, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, g**3, p**3)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        b, p, g = t.shape[0], self.config.patch, self.config.grid
        x = t.view(b, g, g, g, p, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, 1, g * p, g * p, g * p)

    def forward(self, x: torch.Tensor, s: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_in(self.patchify(x)) + self.pos
        c = self.time(timestep_embedding(s, self.config.width)) + self.text(words).sum(1)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.mod_out(F.silu(c))[:, None].chunk(2, -1)
        return self.unpatchify(self.patch_out(self.norm_out(tokens) * (1 + scale) + shift))


def save(model: TinyDiT3D, folder: str | Path, meta: dict) -> None:
    """Write ``config.json`` (architecture + ``meta``) and ``model.safetensors`` (float16 weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": asdict(model.config), **meta}, indent=2) + "\n")


def load(folder: str | Path | None = None, device: torch.device | str = "cpu") -> TinyDiT3D:
    """The model saved in ``folder`` (default: the embedded one), float32, in eval mode."""
    folder = Path(folder) if folder is not None else asset_path()
    meta = json.loads((folder / "config.json").read_text())
    model = TinyDiT3D(Config3d(**meta["architecture"]))
    model.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
    model.meta = meta
    return model.to(device).eval()
