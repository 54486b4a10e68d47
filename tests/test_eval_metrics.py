"""Quality metrics on synthetic pairs: PSNR, SSIM (against a direct loop implementation) and the LPIPS paths."""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

from dit_sparse.eval.metrics import LPIPS, as_video, gaussian_window, psnr, ssim


def _video(seed: int = 0, t: int = 3, h: int = 24, w: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth content (SSIM of pure noise is uninformative)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    frames = [
        np.stack([np.sin(3 * xx + i + c) * 0.4 + 0.5 + 0.05 * rng.standard_normal((h, w)) for c in range(3)], -1)
        for i in range(t)
    ]
    return np.clip(np.stack(frames), 0, 1)


def test_psnr_identical_is_inf() -> None:
    v = _video()
    assert psnr(v, v) == math.inf
    u8 = (v * 255).astype(np.uint8)
    assert psnr(u8, u8.copy()) == math.inf


def test_psnr_known_gaussian_noise() -> None:
    rng = np.random.default_rng(1)
    ref = np.full((4, 32, 32, 3), 0.5)
    sigma = 0.05
    noisy = ref + sigma * rng.standard_normal(ref.shape)
    expected = 10 * math.log10(1 / sigma**2)  # ≈ 26.02 dB
    assert abs(psnr(ref, noisy) - expected) < 0.1
    # uint8 and float inputs agree
    a8, b8 = (ref * 255).round().astype(np.uint8), (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8)
    assert abs(psnr(a8, b8) - psnr(a8 / 255.0, b8 / 255.0)) < 1e-9


def _ssim_direct(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM by an explicit loop over every valid window of every frame and channel (Wang et al. 2004)."""
    win = gaussian_window(size, sigma).numpy()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    t, h, w, c = x.shape
    for f in range(t):
        for ch in range(c):
            a, b = x[f, :, :, ch], y[f, :, :, ch]
            for i in range(h - size + 1):
                for j in range(w - size + 1):
                    pa, pb = a[i : i + size, j : j + size], b[i : i + size, j : j + size]
                    ma, mb = (win * pa).sum(), (win * pb).sum()
                    va, vb = (win * (pa - ma) ** 2).sum(), (win * (pb - mb) ** 2).sum()
                    cov = (win * (pa - ma) * (pb - mb)).sum()
                    vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identical_is_one() -> None:
    v = _video()
    assert ssim(v, v) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_direct_computation() -> None:
    ref = _video(2, t=2, h=18, w=16)
    rng = np.random.default_rng(3)
    dist = np.clip(ref + 0.08 * rng.standard_normal(ref.shape), 0, 1)
    got = ssim(ref, dist)
    assert got == pytest.approx(_ssim_direct(ref, dist), abs=1e-9)
    assert 0.2 < got < 0.95  # plausible for σ=0.08 noise on smooth content
    stronger = np.clip(ref + 0.2 * rng.standard_normal(ref.shape), 0, 1)
    assert ssim(ref, stronger) < got
    # a constant brightness shift keeps structure: SSIM stays high
    assert ssim(ref, np.clip(ref + 0.02, 0, 1)) > 0.95


def test_as_video_shapes_and_errors() -> None:
    v = _video()
    assert as_video(v[None]).shape == (3, 3, 24, 20)
    assert as_video(torch.from_numpy(v)).dtype == torch.float64
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(v, v[:2])
    with pytest.raises(ValueError, match="batch of 2"):
        as_video(np.stack([v, v]))


def test_lpips_with_injected_model() -> None:
    calls: list[tuple[int, ...]] = []

    def fake(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        assert x.min() >= -1 and x.max() <= 1
        return ((x - y) ** 2).mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)

    metric = LPIPS(model=fake, batch=2)
    v = _video(t=5)
    assert metric.status == "ok"
    assert metric(v, v) == 0.0
    d = metric(v, np.clip(v + 0.1, 0, 1))
    assert d is not None and d > 0
    assert calls[0] == (2, 3, 24, 20) and len(calls) == 6  # 5 frames in batches of 2, twice


def test_lpips_unavailable_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # lpips missing (or failing to import torchvision): status says why, the value is None
    monkeypatch.setitem(sys.modules, "lpips", None)
    metric = LPIPS()
    v = _video()
    assert metric(v, v) is None
    assert metric.status.startswith("unavailable: the lpips package could not be imported")
    assert not metric.available


def test_lpips_unavailable_when_backbone_weights_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_lpips = types.ModuleType("lpips")

    def boom(**kwargs: object) -> None:
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    fake_lpips.LPIPS = boom  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lpips", fake_lpips)
    metric = LPIPS()
    assert metric(_video(), _video()) is None
    assert "backbone weights" in metric.status and "name resolution" in metric.status


def _fake_torchvision() -> types.ModuleType:
    """A stand-in for torchvision.models.alexnet: the AlexNet feature stack, randomly initialised."""
    nn = torch.nn

    def alexnet(pretrained: bool = False, **kwargs: object) -> types.SimpleNamespace:
        assert not pretrained, "the test must not ask for downloaded weights"
        features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        return types.SimpleNamespace(features=features)

    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.alexnet = alexnet  # type: ignore[attr-defined]
    tv.models = models  # type: ignore[attr-defined]
    return tv


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="lpips package not installed")
def test_lpips_package_with_random_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real lpips package (its shipped linear heads) on a randomly initialised AlexNet backbone.

    torchvision cannot be imported beside this machine's torch build, so a stub provides ``models.alexnet``
    (the same layer stack, random weights); everything else is lpips' own code.
    """
    tv = _fake_torchvision()
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    torch.manual_seed(0)
    try:
        metric = LPIPS(pretrained_backbone=False)
        v = _video(t=2, h=64, w=64)
        assert metric.available, metric.status
        assert metric(v, v) == pytest.approx(0.0, abs=1e-6)
        small = metric(v, np.clip(v + 0.03 * np.random.default_rng(0).standard_normal(v.shape), 0, 1))
        large = metric(v, np.clip(v + 0.3 * np.random.default_rng(0).standard_normal(v.shape), 0, 1))
        assert small is not None and large is not None and 0 < small < large
    finally:  # don't leave an lpips bound to the stub behind
        for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
            sys.modules.pop(name)
