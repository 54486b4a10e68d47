"""Generating one video, timed: the model's own attention or a method through the public API
(``dit_sparse.apply`` / ``report`` / ``remove``), every transformer forward timed with ``dit_sparse.timing.Timer``."""

from __future__ import annotations

import hashlib
import inspect
import json
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

import dit_sparse
from dit_sparse.api import SparseReport
from dit_sparse.eval.settings import Settings, complete_settings
from dit_sparse.eval.video import to_uint8
from dit_sparse.pipelines import pipeline_transformers
from dit_sparse.timing import Timer

__all__ = ["NATIVE", "ForwardTimer", "Generation", "fingerprint", "generate", "report_fields"]

NATIVE = "none"  # --method none: the model's own attention processors, untouched


def _device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class ForwardTimer:
    """Times every forward of the pipeline's transformer(s) (a pre/post hook pair around each, one :class:`Timer`):
    CUDA events on a GPU, wall clock otherwise."""

    def __init__(self, pipe: Any) -> None:
        self.modules = [m for _, m in pipeline_transformers(pipe)]
        self.timer = Timer()
        self._handles: list[Any] = []
        self._start: Any = None
        self.kind = "cuda-events" if any(_device(m).type == "cuda" for m in self.modules) else "wall-clock"

    def __enter__(self) -> ForwardTimer:
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(partial(self._pre, _device(m))))
            self._handles.append(m.register_forward_hook(self._post))
        return self

    def _pre(self, device: torch.device, *_: Any) -> None:
        self._start = Timer.start(device)

    def _post(self, *_: Any) -> None:
        if self._start is not None:
            self.timer.stop(self._start)
            self._start = None

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward_ms(self) -> list[float]:
        """Milliseconds of each forward, in call order (synchronises CUDA once)."""
        return self.timer.values()


@dataclass
class Generation:
    """One generated video with its timings and (for a sparse method) its report's numbers."""

    video: np.ndarray  # uint8 (T, H, W, 3)
    seconds: float
    forward_ms: list[float]
    steps: int
    timing: str
    report: dict[str, Any] | None = None

    @property
    def transformer_ms_per_step(self) -> float | None:
        """Median forward time × forwards per step."""
        if not self.forward_ms or not self.steps:
            return None
        return statistics.median(self.forward_ms) * len(self.forward_ms) / self.steps


def _call_kwargs(pipe: Any, prompt: str, seed: int, s: Settings) -> dict[str, Any]:
    sig = inspect.signature(pipe.__call__).parameters
    wanted: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": s.negative_prompt,
        "num_inference_steps": s.steps,
        "num_frames": s.frames,
        "height": s.height,
        "width": s.width,
        "guidance_scale": s.guidance,
        "max_sequence_length": s.max_sequence_length,
        "generator": torch.Generator("cpu").manual_seed(int(seed)),
        "output_type": "np",
    }
    missing = [k for k in ("num_inference_steps", "generator") if k not in sig]
    if missing:
        raise TypeError(f"{type(pipe).__name__} takes no {', '.join(missing)}: not a supported video pipeline")
    return {k: v for k, v in wanted.items() if v is not None and k in sig}


def _frames(output: Any) -> np.ndarray:
    frames = output.frames if hasattr(output, "frames") else output[0]
    if isinstance(frames, list | tuple):
        frames = frames[0]
    return to_uint8(frames)


def report_fields(rep: SparseReport) -> dict[str, Any]:
    """The report's numbers as plain data; ``effective_density`` is ``SparseReport.effective_density`` (None when
    no self-attention call was seen)."""
    err = rep.attn_error or {}
    return {
        "method": rep.method,
        "calls": rep.calls,
        "sparse_calls": rep.sparse_calls,
        "dense_calls": rep.dense_calls,
        "density": float(rep.density),
        "effective_density": float(rep.effective_density) if rep.calls else None,
        "report_steps": rep.steps,
        "cfg_passes": list(rep.cfg_passes),
        "attention_ms": float(rep.attention_ms),
        "report_transformer_ms": float(sum(rep.transformer_ms)),
        "attn_out_rel_l2": err.get("out_rel_l2"),
        "attn_lse_rel_l2": err.get("lse_rel_l2"),
    }


def generate(
    pipe: Any,
    prompt: str,
    seed: int,
    settings: Settings,
    *,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    backend: str = "auto",
    error_sample: int = 0,
    progress: bool = True,
    desc: str | None = None,
    leave: bool = False,
) -> Generation:
    """Generate one video: ``method=None`` (or ``"none"``) keeps the model's own attention, any other method name
    goes through ``dit_sparse.apply`` (and ``remove`` afterwards, whatever happens)."""
    settings = complete_settings(settings, pipe)
    kwargs = _call_kwargs(pipe, prompt, seed, settings)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress, desc=desc, leave=leave)
    sparse = method not in (None, NATIVE)
    if sparse:
        dit_sparse.apply(pipe, method, backend=backend, error_sample=error_sample, **(params or {}))
    try:
        if sparse:
            dit_sparse.report(pipe, reset=True)
        with ForwardTimer(pipe) as timer:
            t0 = time.perf_counter()
            with torch.no_grad():
                output = pipe(**kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        rep = report_fields(dit_sparse.report(pipe)) if sparse else None
    finally:
        if sparse:
            dit_sparse.remove(pipe)
    return Generation(_frames(output), seconds, timer.forward_ms(), settings.steps, timer.kind, rep)


def fingerprint(pipe: Any) -> str:
    """A short hash of the denoisers' configs and a sample of their weights (tells random pipelines apart)."""
    h = hashlib.sha1()
    for _, m in pipeline_transformers(pipe):
        h.update(json.dumps(dict(getattr(m, "config", {})), sort_keys=True, default=str).encode())
        params = list(m.parameters())
        for p in (params[:1] + params[-1:]) if params else []:
            h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]
