"""Writing videos: MP4 through imageio-ffmpeg (GIF where no encoder is present) and side-by-side comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ffmpeg_available", "side_by_side", "to_uint8", "write_video"]


def to_uint8(video: Any) -> np.ndarray:
    """A video as ``uint8 (T, H, W, 3)`` from floats in [0, 1] or uint8, ``(T, H, W, C)`` or ``(1, T, H, W, C)``."""
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    v = np.asarray(video)
    if v.ndim == 5 and v.shape[0] == 1:
        v = v[0]
    if v.ndim == 3:
        v = v[..., None]
    if v.ndim != 4:
        raise ValueError(f"expected a video (T, H, W, C), got shape {v.shape}")
    if v.dtype != np.uint8:
        v = (np.clip(v.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if v.shape[-1] == 1:
        v = np.repeat(v, 3, axis=-1)
    return np.ascontiguousarray(v[..., :3])


def ffmpeg_available() -> tuple[bool, str]:
    """Whether imageio-ffmpeg can give an ffmpeg binary, and why not."""
    try:
        import imageio_ffmpeg  # noqa: PLC0415

        imageio_ffmpeg.get_ffmpeg_exe()
        return True, ""
    except Exception as e:  # not installed, or no binary for this platform
        return False, f"{type(e).__name__}: {e}"


def _upscale(v: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so that the short side is at least ``min_side``."""
    side = min(v.shape[1], v.shape[2])
    factor = max(1, -(-min_side // side)) if side < min_side else 1
    if factor > 1:
        v = v.repeat(factor, axis=1).repeat(factor, axis=2)
    return v


def _pad_even(v: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes (yuv420p needs them)."""
    ph, pw = v.shape[1] % 2, v.shape[2] % 2
    if ph or pw:
        v = np.pad(v, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return v


def write_video(path: str | Path, video: Any, *, fps: int = 16, min_side: int = 0) -> tuple[Path, str]:
    """Write ``video`` to ``path`` as MP4 (H.264 via imageio-ffmpeg); where that fails, as GIF next to it.

    Returns the path written and a note (empty, or why a GIF was written instead). ``min_side`` upscales small
    videos (nearest neighbour) so that they can be seen.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = _upscale(to_uint8(video), min_side)
    note = ""
    if path.suffix.lower() != ".gif":
        ok, why = ffmpeg_available()
        if ok:
            try:
                import imageio.v2 as iio  # noqa: PLC0415

                writer = iio.get_writer(
                    str(path),
                    format="FFMPEG",
                    mode="I",
                    fps=fps,
                    codec="libx264",
                    quality=8,
                    macro_block_size=1,
                    pixelformat="yuv420p",
                    ffmpeg_log_level="error",
                )
                try:
                    for frame in _pad_even(frames):
                        writer.append_data(frame)
                finally:
                    writer.close()
                return path, ""
            except Exception as e:  # encoder missing from this ffmpeg build, ...
                why = f"{type(e).__name__}: {e}"
                path.unlink(missing_ok=True)
        note = f"no MP4 encoder available ({why}); wrote a GIF instead"
        path = path.with_suffix(".gif")
    _write_gif(path, frames, fps)
    return path, note


def _write_gif(path: Path, frames: np.ndarray, fps: int) -> None:
    from PIL import Image  # noqa: PLC0415  (pillow comes with matplotlib)

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)


def _label(frame: np.ndarray, text: str) -> np.ndarray:
    """Draw ``text`` in the top-left corner of a frame (white on a dark box)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(img)


def side_by_side(
    dense: Any, sparse: Any, *, amplify: float = 4.0, min_side: int = 192, labels: tuple[str, str] | None = None
) -> np.ndarray:
    """Frames ``dense | sparse | amplified |sparse - dense|`` side by side, uint8 ``(T, H, 3W + 2·gap, 3)``."""
    a, b = to_uint8(dense), to_uint8(sparse)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.float64) * amplify
    d = np.clip(diff, 0, 255).astype(np.uint8)
    a, b, d = (_upscale(x, min_side) for x in (a, b, d))
    gap = np.full((a.shape[0], a.shape[1], 4, 3), 255, np.uint8)
    names = (*(labels or ("dense", "sparse")), f"|diff| x{amplify:g}")
    if a.shape[1] >= 32:
        a, b, d = (np.stack([_label(f, n) for f in x]) for x, n in zip((a, b, d), names, strict=True))
    return np.concatenate([a, gap, b, gap, d], axis=2)
