"""The size of a generation before its model is loaded: tokens per self-attention call, memory and attention time.

Read from the pipeline folder's config files and weight-file headers (no weight is loaded): the VAE's compression
and the transformer's patch give the latent grid and the video tokens ``N``; heads ``H``, head dim ``D`` and layers
``L`` the dense attention work ``4 · passes · H · N² · D · L · steps`` (``passes`` = 2 with classifier-free
guidance). Time is that work at an optimistic rate (``RATES``: no device runs attention faster), so the estimate
is a lower bound. Memory is the weights at the run's dtype, the activations of one block, and what the backend
keeps per attention call: the reference backend (the CPU path) a ``[H, N, N]`` boolean token mask per plan and an
``N²`` score matrix per head and pass in its masked SDPA; triton and flex only block-level tables.
:func:`check_estimate` refuses a run that cannot fit or would take longer than ``REFUSE_S`` (default 1 hour), and
warns above ``WARN_S`` (10 minutes).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RATES = {"cpu": 1e12, "cuda": 1e15}  # FLOP/s of attention, optimistic (fp32 on CUDA: a fifth)
REFUSE_S = 3600.0
WARN_S = 600.0
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class EstimateError(Exception):
    """The run cannot fit or would take very long (the message has the numbers and what to change)."""


@dataclass(frozen=True)
class RunEstimate:
    """What one generation needs (see the module docstring for the model)."""

    latent: tuple[int, int, int]  # token grid (frames, height, width) after the VAE and the patch
    tokens: int  # video tokens per self-attention call
    heads: int
    head_dim: int
    layers: int
    steps: int
    passes: int
    weights_bytes: int
    peak_bytes: int
    attention_flops: float
    seconds: float
    device: str
    available_bytes: int | None

    def summary(self) -> str:
        """One line with the numbers."""
        f, h, w = self.latent
        free = "" if self.available_bytes is None else f" of {_gib(self.available_bytes)} available"
        return (
            f"{self.tokens:,} video tokens per attention call ({f}x{h}x{w}), {self.heads} heads x {self.layers} layers "
            f"x {self.steps} steps x {self.passes} pass(es): {self.attention_flops:.2g} FLOP of attention, at least "
            f"{_duration(self.seconds)} on {self.device}; about {_gib(self.peak_bytes)} of memory{free}"
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def vae_compression(vae: dict[str, Any]) -> tuple[int, int]:
    """(spatial, temporal) compression of a video VAE from its config, the way each family's pipeline reads it."""
    cls = vae.get("_class_name", "")
    spatial = vae.get("scale_factor_spatial") or vae.get("spatial_compression_ratio")
    temporal = vae.get("scale_factor_temporal") or vae.get("temporal_compression_ratio")
    if "spatio_temporal_scaling" in vae:  # LTX: patch x 2^(scaling layers)
        scale = 2 ** sum(bool(x) for x in vae["spatio_temporal_scaling"])
        spatial = spatial or vae.get("patch_size", 4) * scale
        temporal = temporal or vae.get("patch_size_t", 1) * scale
    if cls == "AutoencoderKLCogVideoX" and not spatial:
        spatial = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    if cls == "AutoencoderKLMochi":
        spatial, temporal = spatial or 8, temporal or 6
    return int(spatial or 8), int(temporal or 4)


def _patch(cfg: dict[str, Any]) -> tuple[int, int, int]:
    p = cfg.get("patch_size", 2)
    if isinstance(p, list | tuple):
        return int(p[0]), int(p[1]), int(p[2])
    return int(cfg.get("patch_size_t") or 1), int(p), int(p)


def _weights(folder: Path, dtype: str | None) -> int:
    """Bytes of the pipeline's weights at ``dtype`` (floating tensors; stored dtype when None), from file headers."""
    total = 0
    for path in folder.glob("*/*.safetensors"):
        try:
            with path.open("rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            total += path.stat().st_size
            continue
        for name, info in header.items():
            if name == "__metadata__":
                continue
            stored = _SAFETENSORS_BYTES.get(info["dtype"], 4)
            size = _DTYPE_BYTES[dtype] if dtype is not None and info["dtype"] in ("F32", "F16", "BF16") else stored
            total += math.prod(info["shape"]) * size
    total += sum(p.stat().st_size for p in folder.glob("*/*.bin"))
    return total


def pipeline_call_defaults(folder: str | Path) -> dict[str, Any]:
    """The pipeline class's own call defaults (``num_frames``, ``height``, ``width``, ``num_inference_steps``,
    ``guidance_scale``) for the folder's ``model_index.json`` class; those it leaves None are left out."""
    import inspect  # noqa: PLC0415

    import diffusers  # noqa: PLC0415

    name = _read(Path(folder) / "model_index.json").get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None:
        return {}
    keys = ("num_frames", "height", "width", "num_inference_steps", "guidance_scale")
    params = inspect.signature(cls.__call__).parameters
    return {k: params[k].default for k in keys if k in params and isinstance(params[k].default, int | float)}


def available_memory(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: free device memory; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_run(
    folder: str | Path,
    *,
    frames: int | None,
    height: int | None,
    width: int | None,
    steps: int,
    guidance: float | None,
    device: torch.device,
    dtype: str | None = None,
    backend: str = "reference",
    sparse: bool = True,
    generations: int = 1,
) -> RunEstimate | None:
    """The estimate of ``generations`` generations with the pipeline in ``folder`` (None when the sizes or its
    configs say too little). ``backend`` is the resolved kernel backend; ``sparse=False`` (the model's own
    attention) keeps no token mask."""
    folder = Path(folder)
    cfg = _read(folder / "transformer" / "config.json")
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    if not heads or not head_dim or not frames or not height or not width:
        return None
    s, t = vae_compression(_read(folder / "vae" / "config.json"))
    pt, ph, pw = _patch(cfg)
    latent = (((frames - 1) // t + 1) // pt, height // s // ph, width // s // pw)
    n = math.prod(latent)
    layers = int(cfg.get("num_layers", 1)) + int(cfg.get("num_single_layers", 0))
    passes = 2 if guidance is not None and guidance > 1.0 else 1
    flops = 4.0 * passes * heads * n * n * head_dim * layers * steps * generations
    rate = RATES[device.type if device.type in RATES else "cuda"] / (
        5 if device.type == "cuda" and dtype in (None, "float32") else 1
    )
    elem = _DTYPE_BYTES.get(dtype or "float32", 4)
    weights = _weights(folder, dtype)
    inner = heads * head_dim
    activations = passes * n * (4 * inner + int(cfg.get("ffn_dim", 4 * inner))) * elem
    attention = 0
    if sparse and backend == "reference":
        attention = heads * n * n + passes * heads * n * n * 4  # the token mask + the masked SDPA's scores
    return RunEstimate(
        latent, n, heads, head_dim, layers, steps, passes, weights, weights + activations + attention, flops,
        flops / rate, str(device), available_memory(device),
    )  # fmt: skip


def check_estimate(est: RunEstimate, *, refuse_s: float = REFUSE_S, warn_s: float = WARN_S) -> str | None:
    """Raise :class:`EstimateError` if the run cannot fit or takes longer than ``refuse_s``; a warning line when it
    takes longer than ``warn_s``, else None."""
    advice = "use fewer --frames, a smaller --height/--width" + (
        ", or a GPU (--device cuda)" if est.device == "cpu" else ""
    )
    if est.available_bytes is not None and est.peak_bytes > est.available_bytes:
        raise EstimateError(f"this run does not fit: {est.summary()}; {advice} (or pass --ignore-estimate)")
    if est.seconds > refuse_s:
        raise EstimateError(
            f"this run would take very long: {est.summary()}; {advice} (or pass --ignore-estimate to run it anyway)"
        )
    if est.seconds > warn_s:
        return f"warning: a long run: {est.summary()}"
    return None
