"""Video writing: MP4 through imageio-ffmpeg, GIF fallback (said so), side-by-side panels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dit_sparse.eval.video import side_by_side, to_uint8, write_video


def _video(t: int = 5, h: int = 16, w: int = 20) -> np.ndarray:
    return np.random.default_rng(0).random((t, h, w, 3))


def test_to_uint8() -> None:
    v = to_uint8(_video()[None])
    assert v.dtype == np.uint8 and v.shape == (5, 16, 20, 3)
    assert to_uint8(np.zeros((2, 4, 4, 1))).shape == (2, 4, 4, 3)


def test_side_by_side_layout() -> None:
    a = _video()
    sbs = side_by_side(a, a, min_side=32)
    # three panels upscaled ×2 (16 → 32) with two 4-pixel gaps; identical videos → black difference panel
    assert sbs.shape == (5, 32, 3 * 40 + 8, 3)
    assert sbs[:, 16:, -40:].max() == 0
    with pytest.raises(ValueError, match="differ in shape"):
        side_by_side(a, a[:3])


def test_write_mp4_and_read_back(tmp_path: Path) -> None:
    import imageio.v2 as iio

    path, note = write_video(tmp_path / "v.mp4", _video(h=15, w=21), fps=8)  # odd sizes are padded
    assert note == "" and path.suffix == ".mp4"
    frames = iio.mimread(path)
    assert len(frames) == 5 and frames[0].shape == (16, 22, 3)


def test_gif_fallback_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules["dit_sparse.eval.video"], "ffmpeg_available", lambda: (False, "no binary"))
    path, note = write_video(tmp_path / "v.mp4", _video())
    assert path == tmp_path / "v.gif" and path.is_file() and not (tmp_path / "v.mp4").exists()
    assert "no MP4 encoder available (no binary)" in note
