"""What a run generates and with what: generation settings, the model folder, prompts, and the checks of every
argument that are made before the model is loaded (a clear ``ValueError`` each, never a late traceback)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dit_sparse import defaults

__all__ = [
    "BUILTIN_PROMPTS",
    "DTYPES",
    "Settings",
    "check_backend",
    "check_device",
    "check_dtype",
    "check_error_sample",
    "check_folder",
    "check_positive",
    "check_seeds",
    "complete_settings",
    "default_device",
    "default_model_path",
    "default_value",
    "is_embedded_model",
    "load_pipeline",
    "read_prompts",
    "resolve_model_path",
    "resolve_settings",
]

# in the caption grammar the embedded tiny model was trained on (dit_sparse/train/data.py): moving coloured shapes
BUILTIN_PROMPTS = [
    "a red circle moving right quickly on a black background",
    "a blue square moving left slowly on a gray background",
    "a yellow triangle moving down quickly on a striped background",
    "a green circle moving up slowly and a orange square moving left quickly on a checkered background",
]

#: The dtypes a pipeline can be loaded in, by name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_value(names: Sequence[str], fallback: Any) -> Any:
    """The first of ``names`` set in :mod:`dit_sparse.defaults`, else ``fallback``."""
    return next((getattr(defaults, n) for n in names if getattr(defaults, n, None) is not None), fallback)


def default_model_path() -> Path:
    """The embedded tiny model's folder (``dit_sparse.defaults.MODEL_PATH``)."""
    return Path(defaults.MODEL_PATH)


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


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


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
    """Settings from the given values (checked); unset ones from :mod:`dit_sparse.defaults` when the model is the
    embedded one (``embedded``), else left to the pipeline's own defaults (steps: see :func:`complete_settings`);
    fps defaults to 16."""
    steps, frames, height, width = (
        _positive_int(n, v) for n, v in (("steps", steps), ("frames", frames), ("height", height), ("width", width))
    )
    max_sequence_length = _positive_int("max_sequence_length", max_sequence_length)
    fps = _positive_int("fps", fps)
    if guidance is not None and (
        isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance)
    ):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    if embedded:
        steps = defaults.STEPS if steps is None else steps
        frames = defaults.FRAMES if frames is None else frames
        height = defaults.HEIGHT if height is None else height
        width = defaults.WIDTH if width is None else width
        guidance = defaults.GUIDANCE if guidance is None else guidance
        fps = defaults.FPS if fps is None else fps
    return Settings(
        steps=steps or 0,
        frames=frames,
        height=height,
        width=width,
        guidance=guidance,
        negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length,
        fps=fps or 16,
    )


def complete_settings(settings: Settings, pipe: Any) -> Settings:
    """Steps 0 (unset) → the pipeline's own default ``num_inference_steps`` (50 where it declares none)."""
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
    try:
        return Path(model).expanduser().resolve() == default_model_path().resolve()
    except OSError:
        return False


def resolve_model_path(model: str | Path | None) -> Path:
    """The local Diffusers pipeline folder to load (None: the embedded model), with clear errors."""
    if model is None:
        path = default_model_path()
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


def check_dtype(dtype: Any) -> torch.dtype | None:
    """``None``, a name of :data:`DTYPES` or one of its torch dtypes → the torch dtype; a ValueError otherwise."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def check_device(device: Any) -> str | None:
    """``None`` or a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...) as a string; a ValueError
    for an unknown device string or a GPU that is not there."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; write cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: only {count} CUDA GPU(s) visible (cuda:0 to cuda:{count - 1})")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: dit-sparse eval runs on cpu or cuda")
    return str(dev)


def check_backend(backend: str, device: str | torch.device) -> None:
    """A ValueError unless ``backend`` is a kernel backend that runs on ``device``."""
    from dit_sparse.kernels import resolve_backend  # noqa: PLC0415

    try:
        resolve_backend(backend, torch.device(device))
    except RuntimeError as e:
        raise ValueError(str(e)) from None


def check_seeds(seeds: Iterable[int]) -> list[int]:
    """Seeds as a non-empty list of distinct integers in ``[0, 2**63)``; a ValueError naming the bad one."""
    if isinstance(seeds, str | bytes) or not isinstance(seeds, Iterable):
        raise ValueError(f"seeds must be a list of integers (e.g. [0, 1]), got {seeds!r}")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < 2**63:
            raise ValueError(f"bad seed {s!r}: seeds are integers from 0 to 2**63 - 1")
        if s in out:
            raise ValueError(f"seed {s} given twice")
        out.append(int(s))
    if not out:
        raise ValueError("no seeds given")
    return out


def check_error_sample(error_sample: Any) -> int:
    """``error_sample`` as an integer >= 0 (0: no attention error measured); a ValueError otherwise."""
    if isinstance(error_sample, bool) or not isinstance(error_sample, numbers.Integral) or error_sample < 0:
        raise ValueError(
            f"error_sample must be an integer >= 0 (every n-th layer measures its attention error; 0: off), "
            f"got {error_sample!r}"
        )
    return int(error_sample)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite number > 0; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_folder(name: str, path: Path) -> None:
    """A ValueError unless ``path`` is a folder or can be made one (nothing on its way is a file)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{name} {str(path)!r}: {str(p)!r} is a file, not a folder; give another path")
            return


def load_pipeline(model: str | Path | None = None, *, device: str | None = None, dtype: Any = None) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a local folder (no download), moved to ``device`` (default: cuda if
    present, else cpu), in ``dtype`` (a name of :data:`DTYPES` or a torch dtype; default: as saved)."""
    from diffusers import DiffusionPipeline  # noqa: PLC0415

    path = resolve_model_path(model)
    torch_dtype = check_dtype(dtype)
    device = check_device(device) or default_device()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    return pipe.to(device)


def read_prompts(prompts: str | Path | Sequence[str] | None) -> list[str]:
    """Prompts from a list, a text file (one per line, ``#`` comments) or ``"builtin"`` (:data:`BUILTIN_PROMPTS`)."""
    if prompts is None or (isinstance(prompts, str) and prompts == "builtin"):
        return list(BUILTIN_PROMPTS)
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
    if any(not p.strip() for p in out):
        raise ValueError("a prompt is empty")
    return out
