"""Pre-tuning: fill the tuning file (:mod:`dit_sparse.kernels.tuning_cache`) before a generation, so that its first
steps do not time kernel configurations.

:func:`tune` calls the Triton attention kernel on random plans at the given problem shapes and densities, and
AdaSpa's block-mass kernel (:mod:`dit_sparse.kernels.block_mass`, with and without a given LSE) at the same shapes,
on q, k and v laid out as Diffusers passes them (``[B, N, H, D]`` memory seen as ``[B, H, N, D]``); each new tuning
key is timed once and stored, keys already in the file are only read back.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import torch

from dit_sparse.kernels import block_sparse_attention
from dit_sparse.kernels.block_mass import block_mass
from dit_sparse.kernels.tuning_cache import ENV, cache_folder
from dit_sparse.plan import BlockPlan, num_blocks

KERNELS = ("attention", "block-mass")
"""What :func:`tune` can tune: the block-sparse attention kernel, AdaSpa's block-mass (search) kernel."""


class TuneError(RuntimeError):
    """Pre-tuning cannot run here (no CUDA, tuning cache or autotuning off); the message says what to change."""


def random_plan(
    seq_len: int,
    heads: int,
    block: int,
    density: float,
    permuted: bool = False,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> BlockPlan:
    """A plan where every (head, query block) row keeps its diagonal block plus random others, ``round(density ·
    Mk)`` blocks a row (density 1: the full plan), with a random token order when ``permuted``: the plans the kernel
    benchmark times (``benchmarks/kernel_speed.py``) and ``tune`` tunes."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    m = num_blocks(seq_len, block)
    perm = torch.randperm(seq_len, generator=generator) if permuted else None
    if density >= 1.0:
        mask = torch.ones(1, heads, m, m, dtype=torch.bool)
    else:
        scores = torch.rand(heads, m, m, generator=generator)
        scores[:, torch.arange(m), torch.arange(m)] = 2.0  # the diagonal always wins
        mask = torch.zeros(heads, m, m, dtype=torch.bool).scatter_(
            -1, scores.topk(max(1, round(density * m)), -1).indices, True
        )
        mask = mask.unsqueeze(0)
    return BlockPlan.from_block_mask(
        mask.to(device or "cpu"), seq_len, block, perm=None if perm is None else perm.to(device or "cpu")
    )


def tune(
    shapes: Sequence[tuple[int, int, int]],
    head_dims: Sequence[int] = (128,),
    dtypes: Sequence[torch.dtype] = (torch.bfloat16,),
    densities: Sequence[float] = (1.0, 0.5, 0.25, 0.125, 0.0625),
    *,
    blocks: Sequence[int] = (128,),
    permuted: Sequence[bool] = (False, True),
    precisions: Sequence[str] = ("bf16",),
    kernels: Sequence[str] = KERNELS,
    device: torch.device | str = "cuda",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Tune the Triton kernels for every combination of ``shapes`` (``(batch, heads, seq_len)``), ``head_dims``,
    ``dtypes`` (default bfloat16) and ``blocks`` (plan block sizes, default 128, the methods' default; AdaSpa's is
    64); the results go to the tuning file. ``kernels`` (default both of :data:`KERNELS`): ``attention`` is tuned
    for every ``densities`` (default 1 down to 1/16, one per tuning octave), ``permuted`` (plans with a token order,
    default both) and ``precisions`` (the kernel's ``precision``, default ``bf16``; ``fp8`` needs sm90+);
    ``block-mass`` with the LSE computed and with it given (AdaSpa's first and later searches).

    Returns one row per combination: ``kernel``, the problem, ``config`` (the configuration chosen) and ``source``:
    ``tuned`` (timed now), ``cache`` (read from the tuning file or the shipped table) or ``untimed`` (a key already
    chosen in this process, or a single candidate configuration: nothing to tune).
    Needs CUDA, the tuning cache on and autotuning on (else a :class:`TuneError` that says what to change).
    """
    device = torch.device(device)
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise TuneError(f"unknown kernel(s) {', '.join(unknown)}; choose among {', '.join(KERNELS)}")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise TuneError(f"tune needs a CUDA GPU (the Triton kernel is timed on it); got device {device}")
    if cache_folder() is None:
        raise TuneError(f"the tuning cache is off ({ENV}=off): the results would be lost; unset {ENV}")
    if os.environ.get("DIT_SPARSE_AUTOTUNE", "1") == "0":
        raise TuneError("autotuning is off (DIT_SPARSE_AUTOTUNE=0): nothing would be tuned; unset it")
    from dit_sparse.kernels import block_mass as bm  # needs triton: imported only when tuning
    from dit_sparse.kernels import triton_attention as ta

    def timed(tuner: Any, run: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
        n_log = len(tuner.log)
        run(*args, **kwargs)
        new = tuner.log[n_log:]
        return str(tuner.last), "untimed" if not new else "cache" if "cached" in new[0] else "tuned"

    generator = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for (batch, heads, seq_len), d, dtype, block in itertools.product(shapes, head_dims, dtypes, blocks):
        problem = dict(batch=batch, heads=heads, seq_len=seq_len, head_dim=d, dtype=str(dtype), block=block)
        q, k, v = (torch.randn(batch, seq_len, heads, d, dtype=dtype, device=device).transpose(1, 2) for _ in "qkv")
        if "attention" in kernels:
            for density, perm, precision in itertools.product(densities, permuted, precisions):
                plan = random_plan(seq_len, heads, block, density, perm, device=device, generator=generator)
                config, source = timed(ta.TUNER, block_sparse_attention, q, k, v, plan, backend="triton",
                                       precision=precision)  # fmt: skip
                rows.append(dict(kernel="attention", **problem, density=density, permuted=perm,
                                 precision=precision, config=config, source=source))  # fmt: skip
        if "block-mass" in kernels:
            lse = torch.zeros(batch, heads, seq_len, dtype=torch.float32, device=device)
            for given in (None, lse):
                config, source = timed(bm.TUNER, block_mass, q, k, block, given, backend="triton")
                rows.append(dict(kernel="block-mass", **problem, lse="given" if given is not None else "computed",
                                 config=config, source=source))  # fmt: skip
        del q, k, v
    torch.cuda.synchronize(device)
    return rows


__all__ = ["KERNELS", "TuneError", "random_plan", "tune"]
