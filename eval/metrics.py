"""Video quality metrics against a dense reference: PSNR, SSIM (own torch implementation) and LPIPS.

``caption_ok`` is the embedded model's own check: does the video show each named colour moving as the prompt says.

Videos are ``(T, H, W, C)`` arrays or tensors: ``uint8`` in [0, 255] or floats in [0, 1] (what Diffusers
pipelines return with ``output_type="np"``; a leading batch dimension of 1 is dropped). Every metric is computed
over all frames of a video and returned as one float.

LPIPS comes from the ``lpips`` package (Zhang et al. 2018). Its AlexNet/VGG backbone weights are torchvision's
pretrained weights, downloaded once into the torch hub cache; where they (or torchvision, or lpips) cannot be
loaded, :class:`LPIPS` says why in :attr:`LPIPS.status` and returns ``None`` — never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dit_sparse.train.captions import check_video, parse_caption

VideoLike = Any  # np.ndarray | torch.Tensor | list of frames

__all__ = ["LPIPS", "as_video", "caption_ok", "psnr", "ssim", "gaussian_window"]


def as_video(video: VideoLike) -> torch.Tensor:
    """A video as a float64 tensor ``(T, C, H, W)`` in [0, 1] from ``(T, H, W, C)`` uint8 / float input."""
    if isinstance(video, list | tuple):
        video = np.stack([np.asarray(f) for f in video])
    t = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    t = t.detach().cpu()
    if t.ndim == 5:
        if t.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {t.shape[0]} (shape {tuple(t.shape)})")
        t = t[0]
    if t.ndim == 3:  # (T, H, W) grey
        t = t[..., None]
    if t.ndim != 4:
        raise ValueError(f"expected a video (T, H, W, C), got shape {tuple(t.shape)}")
    if t.shape[-1] not in (1, 3, 4) and t.shape[1] in (1, 3, 4):
        raise ValueError(f"expected channels last (T, H, W, C), got shape {tuple(t.shape)}")
    t = t[..., :3] if t.shape[-1] == 4 else t
    t = t.to(torch.float64) / 255.0 if t.dtype == torch.uint8 else t.to(torch.float64)
    return t.permute(0, 3, 1, 2).contiguous()


def _pair(a: VideoLike, b: VideoLike) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_video(a), as_video(b)
    if x.shape != y.shape:
        raise ValueError(f"videos differ in shape: {tuple(x.shape)} vs {tuple(y.shape)} (T, C, H, W)")
    return x, y


def psnr(a: VideoLike, b: VideoLike) -> float:
    """PSNR in dB over the whole video (data range 1); ``inf`` for identical videos."""
    x, y = _pair(a, b)
    mse = torch.mean((x - y) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(1.0 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 2-D Gaussian window ``(size, size)`` of Wang et al. (2004), float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    a: VideoLike, b: VideoLike, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> float:
    """Mean SSIM over frames and channels (Gaussian 11×11 window, σ=1.5, K1=0.01, K2=0.03, data range 1).

    The statistics use only windows that lie fully inside the frame ("valid", as in Wang et al.'s reference
    code). Frames smaller than the window use the largest odd window that fits.
    """
    x, y = _pair(a, b)
    t, c, h, w = x.shape
    size = min(window, h, w)
    size = size if size % 2 == 1 else size - 1
    if size < 1:
        raise ValueError(f"frames of {h}×{w} are too small for SSIM")
    kernel = gaussian_window(size, sigma)[None, None].expand(c, 1, size, size).contiguous()
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float((num / den).mean().item())


# a model taking two batches (N, 3, H, W) in [-1, 1] and returning distances (N, 1, 1, 1) or (N,)
LpipsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LPIPS:
    """LPIPS distance between two videos (mean over frames), or ``None`` with the reason in :attr:`status`.

    Args:
        net: backbone of the ``lpips`` package (``"alex"``, the paper's default, ``"vgg"`` or ``"squeeze"``).
        device: where the network runs.
        model: an already built model (``lpips.LPIPS`` or any callable with its signature); skips loading.
        pretrained_backbone: ``False`` builds lpips with a randomly initialised backbone (tests only: the
            numbers mean nothing).
        batch: frames per forward.

    The model is loaded lazily on the first call (or :meth:`load`); a failure never raises.
    """

    def __init__(
        self,
        net: str = "alex",
        *,
        device: str | torch.device = "cpu",
        model: LpipsModel | None = None,
        pretrained_backbone: bool = True,
        batch: int = 16,
    ) -> None:
        self.net = net
        self.device = torch.device(device)
        self.pretrained_backbone = pretrained_backbone
        self.batch = batch
        self._model: LpipsModel | None = model
        self._reason: str | None = None
        self._loaded = model is not None

    @property
    def status(self) -> str:
        """``"ok"``, ``"not loaded"`` or ``"unavailable: <why>"``."""
        if not self._loaded:
            return "not loaded"
        return "ok" if self._model is not None else f"unavailable: {self._reason}"

    @property
    def available(self) -> bool:
        """Whether the model loaded (loads it if needed)."""
        self.load()
        return self._model is not None

    def load(self) -> LPIPS:
        """Load the lpips model once; on failure remember why."""
        if self._loaded:
            return self
        self._loaded = True
        try:
            import lpips  # noqa: PLC0415  (optional dependency)
        except Exception as e:  # ImportError, or torchvision failing to import inside lpips
            self._reason = (
                f"the lpips package could not be imported ({type(e).__name__}: {e}); "
                "install it with `pip install 'dit-sparse[lpips]'` (it needs a torchvision matching torch)"
            )
            return self
        try:
            model = lpips.LPIPS(net=self.net, pnet_rand=not self.pretrained_backbone, verbose=False)
        except Exception as e:  # backbone weights: torchvision downloads them into the torch hub cache
            self._reason = (
                f"lpips could not load its {self.net!r} backbone weights ({type(e).__name__}: {e}); they are "
                f"torchvision's pretrained weights, downloaded once into {torch.hub.get_dir()}/checkpoints"
            )
            return self
        self._model = model.to(self.device).eval()
        return self

    @torch.no_grad()
    def __call__(self, a: VideoLike, b: VideoLike) -> float | None:
        """Mean LPIPS over frames, or ``None`` where the model is unavailable."""
        self.load()
        if self._model is None:
            return None
        x, y = _pair(a, b)
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        total, count = 0.0, 0
        for i in range(0, x.shape[0], self.batch):
            xa = (x[i : i + self.batch] * 2 - 1).to(self.device, torch.float32)
            ya = (y[i : i + self.batch] * 2 - 1).to(self.device, torch.float32)
            d = self._model(xa, ya).reshape(xa.shape[0], -1).mean(dim=1)
            total += float(d.sum().item())
            count += xa.shape[0]
        return total / count


def caption_ok(video: np.ndarray, prompt: str) -> bool | None:
    """The embedded model's caption check on one generated video (``dit_sparse.train.captions``): does it show
    each colour named in ``prompt`` moving in the named direction? None when the prompt names no object."""
    if not parse_caption(prompt):
        return None
    frames = video.astype(np.float32) / 255.0 if video.dtype == np.uint8 else video
    return check_video(frames, prompt).ok
