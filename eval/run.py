"""Quality-vs-speed runs: every method against the model's own dense attention, same prompts, seeds and scheduler.

``dit_sparse.eval.run(model=..., methods=["window", "radial"], prompts="builtin", seeds=[0], out="runs/x")``
(or ``dit-sparse eval``) does, for every (prompt, seed):

* the dense reference: the pipeline with its own attention processors, generated once and cached on disk per
  (model, prompt, seed, steps, size, guidance, device, dtype) under ``<out>/dense`` (or ``cache_dir``);
* every method setting through the public API (``dit_sparse.apply`` / ``report`` / ``remove``): PSNR, SSIM and
  LPIPS of its video against the reference, attention-level error (``report().attn_error``), density, attention
  and transformer time per denoising step, and the speedup against the dense transformer time measured in this
  same process (the latest dense generation; when the references come from the cache, dense is generated once
  more for its timing);
* on the embedded model, ``caption_ok``: whether the method's video still passes the model's caption check (each
  named colour found and moving in the named direction, ``dit_sparse/train/captions.py``); None elsewhere.

Transformer time is measured around every transformer forward (CUDA events on a GPU, wall clock otherwise); the
per-step figure is the median forward time × forwards per step (the median drops the warm-up forward).
Results: ``results.jsonl`` written row by row (a rerun skips finished rows), ``results.csv``, a summary table,
``pareto.png`` (speedup vs PSNR, one labelled point per setting) and ``videos/`` side by side
(dense | sparse | amplified difference) per prompt and setting, for the first seed.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_sparse.eval.metrics import LPIPS, psnr, ssim
from dit_sparse.eval.video import side_by_side, to_uint8, write_video
from dit_sparse.methods.base import split_method_spec
from dit_sparse.train.captions import check_video, parse_caption

__all__ = [
    "BUILTIN_PROMPTS",
    "Generation",
    "MethodSpec",
    "Settings",
    "generate",
    "load_pipeline",
    "parse_methods",
    "read_prompts",
    "complete_settings",
    "resolve_settings",
    "run",
    "split_method_list",
    "summarize",
]

# in the caption grammar the embedded tiny model was trained on (dit_sparse/train/data.py): moving coloured shapes
BUILTIN_PROMPTS = [
    "a red circle moving right quickly on a black background",
    "a blue square moving left slowly on a gray background",
    "a yellow triangle moving down quickly on a striped background",
    "a green circle moving up slowly and a orange square moving left quickly on a checkered background",
]

NATIVE = "none"  # --method none: the model's own attention processors, untouched


# ------------------------------------------------------------------------------------------------ settings


def _defaults() -> Any:
    """``dit_sparse.defaults`` (the embedded tiny model's settings) or None while it does not exist."""
    try:
        from dit_sparse import defaults  # noqa: PLC0415
    except ImportError:
        return None
    return defaults


def _default(names: Sequence[str], fallback: Any) -> Any:
    mod = _defaults()
    for name in names:
        if mod is not None and getattr(mod, name, None) is not None:
            return getattr(mod, name)
    return fallback


def default_value(names: Sequence[str], fallback: Any) -> Any:
    """The first of ``names`` set in ``dit_sparse.defaults``, else ``fallback``."""
    return _default(names, fallback)


def default_model_path() -> Path | None:
    """The embedded tiny model's folder from ``dit_sparse.defaults`` (None if it is not defined)."""
    path = _default(("MODEL_PATH", "MODEL", "MODEL_DIR", "TINY_MODEL"), None)
    return Path(path) if path is not None else None


@dataclass(frozen=True)
class Settings:
    """Generation settings shared by the dense reference and every method (``None``: the pipeline's default)."""

    steps: int  # 0: the pipeline's default (see complete_settings)
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    fps: int = 16

    def key(self) -> dict[str, Any]:
        """Fields that change the video (fps does not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "fps"}


def resolve_settings(
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
    fps: int | None = None,
    *,
    embedded: bool = True,
) -> Settings:
    """Settings from the given values; unset ones from ``dit_sparse.defaults`` when the model is the embedded one
    (``embedded``), else left to the pipeline's own defaults (steps: see :func:`complete_settings`)."""

    def d(names: Sequence[str], fallback: Any = None) -> Any:
        return _default(names, fallback) if embedded else fallback

    steps = steps if steps is not None else d(("STEPS", "NUM_INFERENCE_STEPS", "NUM_STEPS"))
    return Settings(
        steps=int(steps) if steps is not None else 0,
        frames=frames if frames is not None else d(("FRAMES", "NUM_FRAMES")),
        height=height if height is not None else d(("HEIGHT",)),
        width=width if width is not None else d(("WIDTH",)),
        guidance=guidance if guidance is not None else d(("GUIDANCE", "GUIDANCE_SCALE")),
        negative_prompt=negative_prompt if negative_prompt is not None else d(("NEGATIVE_PROMPT",)),
        max_sequence_length=(
            max_sequence_length if max_sequence_length is not None else d(("MAX_SEQUENCE_LENGTH", "TEXT_LEN"))
        ),
        fps=int(fps if fps is not None else d(("FPS",), 16)),
    )


def complete_settings(settings: Settings, pipe: Any) -> Settings:
    """Steps 0 (unset) → the pipeline's own default ``num_inference_steps``."""
    if settings.steps:
        return settings
    param = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    default = param.default if param is not None and isinstance(param.default, int) else 50
    return dataclasses.replace(settings, steps=default)


def is_embedded_model(model: Any) -> bool:
    """Whether ``model`` (None, a path or a pipeline) is the embedded default model."""
    if model is None:
        return True
    if not isinstance(model, str | Path):
        return False
    default = default_model_path()
    try:
        return default is not None and Path(model).expanduser().resolve() == default.resolve()
    except OSError:
        return False


def resolve_model_path(model: str | Path | None) -> Path:
    """The local Diffusers pipeline folder to load, with clear errors."""
    if model is None:
        path = default_model_path()
        if path is None:
            raise FileNotFoundError(
                "no --model given and no embedded default model is defined (dit_sparse.defaults); "
                "pass --model PATH to a local Diffusers pipeline folder"
            )
        if not path.exists():
            raise FileNotFoundError(
                f"the embedded tiny model is not at {str(path)!r} (not built in this checkout?); "
                "pass --model PATH to a local Diffusers pipeline folder"
            )
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model folder {str(path)!r} does not exist (expected a local Diffusers pipeline folder)"
        )
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a Diffusers pipeline folder (no model_index.json in it); "
            "save one with pipe.save_pretrained(PATH)"
        )
    return path.resolve()


def default_device() -> str:
    """``cuda`` where a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str | Path | None = None, *, device: str | None = None, dtype: Any = None) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a local folder (no download), moved to ``device``."""
    from diffusers import DiffusionPipeline  # noqa: PLC0415

    path = resolve_model_path(model)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    return pipe.to(device or default_device())


# ------------------------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class MethodSpec:
    """One method setting of a run: its label (what rows and plots show), registered name and parameters."""

    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple | list):
        return ",".join(_fmt_value(x) for x in v)
    return str(v)


def _label(name: str, params: dict[str, Any]) -> str:
    if not params:
        return name
    return name + ":" + ";".join(f"{k}={_fmt_value(v)}" for k, v in sorted(params.items()))


_SPEC_START = re.compile(r"^[A-Za-z_][\w\-]*(:|$)")


def split_method_list(text: str) -> list[str]:
    """Split ``"dense,window:window=1,1,1;tile=2,8,8,radial"`` into method specs.

    Commas separate methods, but a piece that does not start with a name (``1``, ``8;tile=2``) or that is a
    ``key=value`` continues the previous method's setting.
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if _SPEC_START.match(piece) or not specs:
            specs.append(piece)
        elif "=" in piece.split(";", 1)[0]:  # another key=value of the same method
            specs[-1] += ";" + piece
        else:  # the next element of a comma-separated value
            specs[-1] += "," + piece
    return specs


def parse_methods(
    methods: str | Iterable[str | tuple[str, dict[str, Any]] | MethodSpec],
    params: dict[str, dict[str, Any]] | None = None,
    common: dict[str, Any] | None = None,
) -> list[MethodSpec]:
    """Method settings from specs (``"radial"``, ``"window:window=1,1,1;tile=2,8,8"``), ``(name, params)`` pairs
    or :class:`MethodSpec`; ``params[name]`` and ``common`` are added to every setting of that method / of all.

    Names, keys and values are checked against the registry (clear errors list the known ones).
    """
    from dit_sparse.methods import make_config  # noqa: PLC0415

    items: list[Any] = split_method_list(methods) if isinstance(methods, str) else list(methods)
    out: list[MethodSpec] = []
    for item in items:
        if isinstance(item, MethodSpec):
            name, p = item.name, dict(item.params)
        elif isinstance(item, tuple):
            name, p = item[0], dict(item[1])
        else:
            parts = split_method_list(item)
            if len(parts) != 1:
                out.extend(parse_methods(parts, params, common))
                continue
            name, p = split_method_spec(parts[0])
        p = {**(common or {}), **((params or {}).get(name, {})), **p}
        make_config(name, p)  # validates
        out.append(MethodSpec(_label(name, p) if not isinstance(item, MethodSpec) else item.label, name, p))
    if not out:
        raise ValueError("no methods given")
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"method setting(s) given twice: {', '.join(dup)}")
    return out


def read_prompts(prompts: str | Path | Sequence[str] | None) -> list[str]:
    """Prompts from a list, a text file (one per line, ``#`` comments) or ``"builtin"``."""
    if prompts is None or (isinstance(prompts, str) and prompts == "builtin"):
        return list(_default(("PROMPTS", "BUILTIN_PROMPTS"), BUILTIN_PROMPTS))
    if isinstance(prompts, str | Path):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt file {str(path)!r} does not exist (give a file, one prompt per line, or 'builtin')"
            )
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        out = [ln for ln in lines if ln and not ln.startswith("#")]
        if not out:
            raise ValueError(f"prompt file {str(path)!r} holds no prompts")
        return out
    out = [str(p) for p in prompts]
    if not out:
        raise ValueError("no prompts given")
    return out


# ------------------------------------------------------------------------------------------------ generation


class ForwardTimer:
    """Times every forward of the pipeline's transformer(s): CUDA events on a GPU, wall clock otherwise."""

    def __init__(self, pipe: Any) -> None:
        self.modules = [
            m
            for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
            if isinstance(m, torch.nn.Module)
        ]
        self._handles: list[Any] = []
        self._pending: list[Any] = []
        self._wall: list[float] = []
        self._start: Any = None

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        if _is_cuda(module):
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._start is None:
            return
        if isinstance(self._start, float):
            self._wall.append((time.perf_counter() - self._start) * 1e3)
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        self._start = None

    def __enter__(self) -> ForwardTimer:
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def kind(self) -> str:
        return "cuda-events" if self._pending else "wall-clock"

    def forward_ms(self) -> list[float]:
        """Milliseconds of each forward, in call order (synchronises CUDA)."""
        if self._pending:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self._pending]
        return list(self._wall)


def _is_cuda(module: torch.nn.Module) -> bool:
    p = next(module.parameters(), None)
    return p is not None and p.is_cuda


@dataclass
class Generation:
    """One generated video with its timings and (for a sparse method) its report."""

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


def _api() -> Any:
    import dit_sparse  # noqa: PLC0415

    for name in ("apply", "report", "remove"):
        if not hasattr(dit_sparse, name):
            raise RuntimeError(f"dit_sparse.{name} is not available in this build of dit-sparse (public API missing)")
    return dit_sparse


def report_fields(rep: Any) -> dict[str, Any]:
    """The report's numbers as plain data (attention time summed when it is a list)."""

    def get(name: str, default: Any = None) -> Any:
        return rep.get(name, default) if isinstance(rep, dict) else getattr(rep, name, default)

    def total(x: Any) -> float | None:
        if x is None:
            return None
        if isinstance(x, dict):
            x = list(x.values())
        if isinstance(x, list | tuple):
            return float(sum(float(v) for v in x)) if x else None
        return float(x)

    err = get("attn_error") or {}
    return {
        "method": get("method"),
        "calls": get("calls"),
        "sparse_calls": get("sparse_calls"),
        "dense_calls": get("dense_calls"),
        "density": None if get("density") is None else float(get("density")),
        "report_steps": get("steps"),
        "cfg_passes": get("cfg_passes"),
        "attention_ms": total(get("attention_ms")),
        "report_transformer_ms": total(get("transformer_ms")),
        "attn_out_rel_l2": err.get("out_rel_l2") if isinstance(err, dict) else None,
        "attn_lse_rel_l2": err.get("lse_rel_l2") if isinstance(err, dict) else None,
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
    api = None
    if method not in (None, NATIVE):
        api = _api()
        api.apply(pipe, method, backend=backend, error_sample=error_sample, **(params or {}))
    try:
        if api is not None:
            api.report(pipe, reset=True)
        with ForwardTimer(pipe) as timer:
            t0 = time.perf_counter()
            with torch.no_grad():
                output = pipe(**kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        rep = report_fields(api.report(pipe)) if api is not None else None
    finally:
        if api is not None:
            api.remove(pipe)
    return Generation(_frames(output), seconds, timer.forward_ms(), settings.steps, timer.kind, rep)


# ------------------------------------------------------------------------------------------------ the run


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return None
        return v
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return v


def _num(v: Any) -> float | None:
    """A row value as a float (``"inf"`` → inf), None where absent."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def caption_ok(video: np.ndarray, prompt: str) -> bool | None:
    """The embedded model's caption check on one generated video (``dit_sparse.train.captions``): does it show
    each colour named in ``prompt`` moving in the named direction? None when the prompt names no object."""
    if not parse_caption(prompt):
        return None
    frames = video.astype(np.float32) / 255.0 if video.dtype == np.uint8 else video
    return check_video(frames, prompt).ok


def _fingerprint(pipe: Any) -> str:
    """A short hash of the denoiser's config and a sample of its weights (tells random pipelines apart)."""
    h = hashlib.sha1()
    for name in ("transformer", "transformer_2"):
        m = getattr(pipe, name, None)
        if not isinstance(m, torch.nn.Module):
            continue
        cfg = getattr(m, "config", {})
        h.update(json.dumps(dict(cfg), sort_keys=True, default=str).encode())
        params = list(m.parameters())
        for p in (params[:1] + params[-1:]) if params else []:
            h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n] or "x"


def _row_key(row: dict[str, Any]) -> tuple:
    return (
        row.get("model_id"),
        row.get("prompt"),
        int(row.get("seed", -1)),
        row.get("label"),
        json.dumps(row.get("settings"), sort_keys=True),
    )


def _load_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash: that row is redone
                continue
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(_jsonable(row), sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


class DenseCache:
    """Dense reference videos on disk: ``<dir>/<key>.npz`` (uint8 video) + ``<key>.json`` (what made it)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    @staticmethod
    def key(meta: dict[str, Any]) -> str:
        return hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, meta: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]] | None:
        k = self.key(meta)
        vid, info = self.dir / f"{k}.npz", self.dir / f"{k}.json"
        if not (vid.exists() and info.exists()):
            return None
        try:
            with np.load(vid) as z:
                video = z["video"]
            return video, json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None

    def put(self, meta: dict[str, Any], video: np.ndarray, info: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        k = self.key(meta)
        tmp = self.dir / f"{k}.tmp.npz"
        np.savez_compressed(tmp, video=video)
        os.replace(tmp, self.dir / f"{k}.npz")
        (self.dir / f"{k}.json").write_text(json.dumps(_jsonable({**meta, **info}), indent=1), encoding="utf-8")


def run(
    model: str | Path | Any | None = None,
    methods: str | Iterable[Any] = ("window", "radial"),
    prompts: str | Path | Sequence[str] | None = "builtin",
    seeds: Sequence[int] = (0,),
    out: str | Path = "runs/eval",
    *,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
    fps: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    common_params: dict[str, Any] | None = None,
    backend: str = "auto",
    error_sample: int = 1,
    device: str | None = None,
    dtype: Any = None,
    cache_dir: str | Path | None = None,
    lpips: LPIPS | bool = True,
    videos: bool = True,
    amplify: float = 4.0,
    warmup: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every method on every (prompt, seed) against the dense reference; write and return the rows.

    Args:
        model: a local Diffusers pipeline folder (default: the embedded tiny model) or an already built pipeline.
        methods: method specs (``"radial"``, ``"window:window=1,1,1;tile=2,8,8"``, a comma-separated string of
            them, ``(name, params)`` pairs); ``params[name]`` / ``common_params`` are added to them.
        prompts: a list, a text file (one per line) or ``"builtin"``.
        seeds: one video per (prompt, seed).
        out: the run folder (results.jsonl, results.csv, pareto.png, videos/, dense/).
        steps, frames, height, width, guidance, negative_prompt, max_sequence_length, fps: generation settings
            (default: ``dit_sparse.defaults`` for the embedded model, else the pipeline's own).
        backend: kernel backend handed to ``dit_sparse.apply``.
        error_sample: handed to ``dit_sparse.apply``: every n-th self-attention layer also runs exact attention
            and records the error. It runs in a second, untimed generation of the same video, so that the timed
            one does no extra work (0 turns it off).
        device, dtype: where and how a pipeline loaded from a folder runs (default: cuda if present, else cpu).
        cache_dir: where dense references are cached (default ``<out>/dense``).
        lpips: an :class:`LPIPS` instance, True (the lpips package's AlexNet) or False (skip LPIPS).
        videos: write the side-by-side videos.
        amplify: gain of the difference panel.
        warmup: run one untimed denoising step before anything is timed.

    Returns every row of ``results.jsonl`` (finished earlier ones included).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = parse_methods(methods, params, common_params)
    prompt_list = read_prompts(prompts)
    seed_list = [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("no seeds given")
    settings = resolve_settings(
        steps,
        frames,
        height,
        width,
        guidance,
        negative_prompt,
        max_sequence_length,
        fps,
        embedded=is_embedded_model(model),
    )

    if model is None or isinstance(model, str | Path):
        path = resolve_model_path(model)
        pipe = load_pipeline(path, device=device, dtype=dtype)
        model_id = str(path)
    else:
        pipe = model
        model_id = str(
            getattr(pipe, "name_or_path", None)
            or getattr(getattr(pipe, "config", {}), "_name_or_path", "")
            or type(pipe).__name__
        )
    settings = complete_settings(settings, pipe)
    check_captions = is_embedded_model(model)  # the caption grammar is the embedded model's
    fingerprint = _fingerprint(pipe)
    run_device = str(getattr(pipe, "device", device or "cpu"))
    run_dtype = str(getattr(pipe, "dtype", dtype))
    cache = DenseCache(cache_dir if cache_dir is not None else out / "dense")
    metric = lpips if isinstance(lpips, LPIPS) else (LPIPS(device=run_device) if lpips else None)

    results_path = out / "results.jsonl"
    rows = _load_rows(results_path)
    done = {_row_key(r) for r in rows}
    settings_key = _jsonable(settings.key())
    env = _environment(run_device)
    notes: list[str] = []
    dense_timing: Generation | None = None  # the dense generation timed in this process

    todo = [(p, s, m) for p in prompt_list for s in seed_list for m in specs]
    pending = [
        (p, s, m) for p, s, m in todo if (model_id, p, s, m.label, json.dumps(settings_key, sort_keys=True)) not in done
    ]
    skipped = len(todo) - len(pending)
    if skipped:
        log(f"resuming: {skipped} of {len(todo)} rows already in {results_path}, skipped")

    references: dict[tuple[str, int], np.ndarray] = {}
    if pending and warmup:  # one untimed step: lazy initialisation, allocator, kernel autotuning
        generate(pipe, pending[0][0], pending[0][1], dataclasses.replace(settings, steps=1), progress=False)
    for i, (prompt, seed, spec) in enumerate(pending, 1):
        ref_meta = {
            "model_id": model_id,
            "fingerprint": fingerprint,
            "prompt": prompt,
            "seed": seed,
            "settings": settings_key,
            "device": run_device.split(":")[0],
            "dtype": run_dtype,
        }
        if (prompt, seed) not in references:
            cached = cache.get(ref_meta)
            if cached is not None:
                references[(prompt, seed)] = cached[0]
                log(f"dense reference from cache: {prompt!r} seed {seed}")
            else:
                g = generate(pipe, prompt, seed, settings, progress=progress, desc=f"dense {prompt[:24]!r} s{seed}")
                references[(prompt, seed)] = g.video
                cache.put(ref_meta, g.video, {"seconds": g.seconds, "forward_ms": g.forward_ms, "timing": g.timing})
                dense_timing = g  # the latest dense generation: closest in time to the rows it is compared with
        if dense_timing is None:  # references all came from the cache: time dense once in this process
            dense_timing = generate(pipe, prompt, seed, settings, progress=progress, desc="dense (timing)")
            if not np.array_equal(dense_timing.video, references[(prompt, seed)]):
                diff = int(np.abs(dense_timing.video.astype(int) - references[(prompt, seed)].astype(int)).max())
                log(f"note: the dense video regenerated for timing differs from the cached one (max |diff| {diff}/255)")
        ref = references[(prompt, seed)]

        gen_video = partial(
            generate, pipe, prompt, seed, settings, method=spec.name, params=spec.params, backend=backend
        )
        g = gen_video(progress=progress, desc=f"{spec.label[:24]} s{seed}")
        rep = g.report or {}
        if error_sample > 0:  # a second, untimed pass measures the attention error (it runs exact attention too)
            e = gen_video(error_sample=error_sample, progress=False)
            rep = {**rep, **{k: (e.report or {}).get(k) for k in ("attn_out_rel_l2", "attn_lse_rel_l2")}}
        lp = metric(ref, g.video) if metric is not None else None
        dense_ms = dense_timing.transformer_ms_per_step
        sparse_ms = g.transformer_ms_per_step
        eff_density = None
        if rep.get("calls"):
            d = rep.get("density")
            sc, dc = rep.get("sparse_calls") or 0, rep.get("dense_calls") or 0
            eff_density = ((d if d is not None else 1.0) * sc + dc) / max(1, rep["calls"])
        row: dict[str, Any] = {
            "model_id": model_id,
            "prompt": prompt,
            "seed": seed,
            "label": spec.label,
            "method": spec.name,
            "params": spec.params,
            "settings": settings_key,
            "psnr": psnr(ref, g.video),
            "ssim": ssim(ref, g.video),
            "lpips": lp,
            "lpips_status": "skipped" if metric is None else metric.status,
            "caption_ok": caption_ok(g.video, prompt) if check_captions else None,
            "attn_out_rel_l2": rep.get("attn_out_rel_l2"),
            "attn_lse_rel_l2": rep.get("attn_lse_rel_l2"),
            "density": rep.get("density"),
            "effective_density": eff_density,
            "calls": rep.get("calls"),
            "sparse_calls": rep.get("sparse_calls"),
            "dense_calls": rep.get("dense_calls"),
            "attention_ms_per_step": (rep["attention_ms"] / settings.steps)
            if rep.get("attention_ms") is not None
            else None,
            "transformer_ms_per_step": sparse_ms,
            "dense_transformer_ms_per_step": dense_ms,
            "speedup": (dense_ms / sparse_ms) if dense_ms and sparse_ms else None,
            "seconds": g.seconds,
            "dense_seconds": dense_timing.seconds,
            "e2e_speedup": dense_timing.seconds / g.seconds if g.seconds else None,
            "timing": g.timing,
            "video": None,
            **env,
        }
        if videos and seed == seed_list[0]:
            name = f"p{prompt_list.index(prompt):02d}-{_slug(prompt)}__{_slug(spec.label, 60)}.mp4"
            frames_ = side_by_side(ref, g.video, amplify=amplify, labels=("dense", spec.label[:28]))
            written, note = write_video(out / "videos" / name, frames_, fps=settings.fps)
            row["video"] = str(written.relative_to(out))
            if note and note not in notes:
                notes.append(note)
                log(f"note: {note}")
        _append_row(results_path, row)
        rows.append(_jsonable(row))
        log(
            f"[{i}/{len(pending)}] {spec.label} | {prompt!r} seed {seed}: PSNR {_fmt(row['psnr'], '.2f')} "
            f"SSIM {_fmt(row['ssim'], '.4f')} LPIPS {_fmt(lp, '.4f')} density {_fmt(row['effective_density'], '.3f')} "
            f"speedup {_fmt(row['speedup'], '.2f')}x"
        )

    rows = [r for r in _load_rows(results_path)]
    write_csv(rows, out / "results.csv")
    summary = summarize(rows)
    log(format_table(summary))
    lp_status = {r.get("lpips_status") for r in rows if r.get("lpips") is None}
    for s in sorted(x for x in lp_status if x and x.startswith("unavailable")):
        log(f"LPIPS {s}")
    plot_pareto(
        summary,
        out / "pareto.png",
        title=f"{Path(model_id).name} · {settings.steps} steps · "
        f"{settings.frames or '?'}×{settings.height or '?'}×{settings.width or '?'}",
    )
    log(
        f"wrote {results_path}, {out / 'results.csv'}, {out / 'pareto.png'}"
        + (f", {out / 'videos'}/" if videos else "")
    )
    return rows


def _environment(device: str) -> dict[str, Any]:
    dev_name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda") and torch.cuda.is_available()
        else platform.processor() or platform.machine()
    )
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(v: Any, spec: str) -> str:
    x = _num(v)
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf"
    return format(x, spec)


# ------------------------------------------------------------------------------------------------ outputs

CSV_FIELDS = [
    "label",
    "method",
    "prompt",
    "seed",
    "psnr",
    "ssim",
    "lpips",
    "lpips_status",
    "caption_ok",
    "attn_out_rel_l2",
    "attn_lse_rel_l2",
    "density",
    "effective_density",
    "attention_ms_per_step",
    "transformer_ms_per_step",
    "dense_transformer_ms_per_step",
    "speedup",
    "seconds",
    "dense_seconds",
    "e2e_speedup",
    "timing",
    "calls",
    "sparse_calls",
    "dense_calls",
    "params",
    "settings",
    "model_id",
    "video",
    "device",
    "device_name",
    "torch",
    "triton",
    "date",
]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All rows as CSV (params and settings as JSON text)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for k, v in r.items()})


def _mean(values: Iterable[Any]) -> float | None:
    xs = [x for x in (_num(v) for v in values) if x is not None]
    if not xs:
        return None
    finite = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(finite) if finite else xs[0]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method setting (label): means over prompts and seeds (PSNR over finite values; inf if all are)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        out.append(
            {
                "label": label,
                "videos": len(rs),
                **{
                    k: _mean(r.get(k) for r in rs)
                    for k in (
                        "psnr",
                        "ssim",
                        "lpips",
                        "caption_ok",
                        "attn_out_rel_l2",
                        "effective_density",
                        "attention_ms_per_step",
                        "transformer_ms_per_step",
                        "dense_transformer_ms_per_step",
                        "speedup",
                    )
                },
            }
        )
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a fixed-width text table."""
    cols = [
        ("setting", "label", "s"),
        ("n", "videos", "d"),
        ("PSNR", "psnr", ".2f"),
        ("SSIM", "ssim", ".4f"),
        ("LPIPS", "lpips", ".4f"),
        ("caption", "caption_ok", ".2f"),
        ("attn err", "attn_out_rel_l2", ".4f"),
        ("density", "effective_density", ".3f"),
        ("attn ms/step", "attention_ms_per_step", ".2f"),
        ("xfmr ms/step", "transformer_ms_per_step", ".2f"),
        ("dense ms/step", "dense_transformer_ms_per_step", ".2f"),
        ("speedup", "speedup", ".2f"),
    ]
    cells = [[h for h, _, _ in cols]]
    for s in summary:
        cells.append([str(s[k]) if f in ("s", "d") else _fmt(s[k], f) for _, k, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def short_labels(rows_or_summary: list[dict[str, Any]]) -> dict[str, str]:
    """Label → a shorter one for plots: parameters set alike in every setting of a method are left out."""
    labels = list(dict.fromkeys(r["label"] for r in rows_or_summary))
    parsed = {}
    for label in labels:
        try:
            parsed[label] = split_method_spec(label)
        except ValueError:
            parsed[label] = (label, {})
    out = {}
    for label, (name, params) in parsed.items():
        same = [p for n, p in parsed.values() if n == name]
        keep = {k: v for k, v in params.items() if len(same) > 1 and any(p.get(k) != v for p in same)}
        out[label] = _label(name, keep)
    if len(set(out.values())) < len(out):  # shortening made two alike: keep the full labels
        return {label: label for label in labels}
    return out


def plot_pareto(summary: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Speedup (x) vs PSNR (y), one labelled point per setting, the Pareto front dashed; infinite PSNR on top.

    Points are labelled with :func:`short_labels`; the full settings are listed under the plot when they differ.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    short = short_labels(summary)
    pts = [(s["label"], _num(s["speedup"]), _num(s["psnr"])) for s in summary]
    finite = [p for _, _, p in pts if p is not None and math.isfinite(p)]
    top = (max(finite) + 3.0) if finite else 50.0
    xs = [1.0 if x is None else x for _, x, y in pts if y is not None]
    x_mid = (min(xs) + max(xs)) / 2 if xs else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    xy = []
    for label, x, y in pts:
        if y is None:
            continue
        x = 1.0 if x is None else x
        shown = top if math.isinf(y) else y
        ax.scatter([x], [shown], s=40, zorder=3, marker="^" if math.isinf(y) else "o")
        right = x > x_mid and len(xs) > 1
        ann = ax.annotate(
            short[label] + (" (PSNR inf)" if math.isinf(y) else ""),
            (x, shown),
            textcoords="offset points",
            xytext=(-6 if right else 6, 5),
            fontsize=8,
            ha="right" if right else "left",
        )
        ann.set_in_layout(False)
        xy.append((x, shown))
    front = sorted(p for p in xy if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in xy))
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", lw=1, zorder=2, label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    ax.axvline(1.0, color="lightgrey", lw=1, zorder=1)
    ax.set_xlabel("speedup vs dense (transformer time per step)")
    ax.set_ylabel("PSNR vs dense video (dB)")
    ax.set_title(title or "quality vs speed", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.12)
    notes = [f"{short[label]} = {label}" for label in short if short[label] != label]
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", ha="left", family="monospace")
        fig.tight_layout(rect=(0, 0.03 + 0.025 * len(notes), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
