"""Small helpers shared by the training scripts: logging, timing, PSNR, optimizer state files."""

from __future__ import annotations

import math
import time

import torch


class Clock:
    """Wall-clock budget for a training run."""

    def __init__(self, minutes: float) -> None:
        self.start = time.time()
        self.budget = minutes * 60.0

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.time() - self.start

    @property
    def frac(self) -> float:
        """Fraction of the budget used."""
        return self.elapsed / max(self.budget, 1e-9)

    def done(self) -> bool:
        """True once the budget is spent."""
        return self.elapsed >= self.budget


def lr_at(base: float, step: int, frac: float, warmup: int = 100, decay_from: float = 0.8) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then cosine decay to 10% over the last part of the run."""
    lr = base * min(1.0, (step + 1) / warmup)
    if frac > decay_from:
        t = min(1.0, (frac - decay_from) / (1 - decay_from))
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return lr


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of videos in [-1, 1] (computed on the [0, 1] scale)."""
    mse = (((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Adam moments as bf16 tensors keyed by parameter name (compact, for resuming)."""
    out: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            out[f"opt.m.{n}"] = st["exp_avg"].to(torch.bfloat16)
            out[f"opt.v.{n}"] = st["exp_avg_sq"].to(torch.bfloat16)
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor], step: int
) -> int:
    """Restore Adam moments saved by ``optimizer_tensors``; returns how many parameters were restored."""
    n_loaded = 0
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if f"opt.m.{n}" in tensors:
                opt.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[f"opt.m.{n}"].to(p.device, torch.float32),
                    "exp_avg_sq": tensors[f"opt.v.{n}"].to(p.device, torch.float32),
                }
                n_loaded += 1
    return n_loaded


def log(msg: str) -> None:
    """Print with a timestamp, flushed."""
    print(time.strftime("%H:%M:%S"), msg, flush=True)
