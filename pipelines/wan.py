"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): video-only self-attention (``blocks.i.attn1``), text by cross-attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_sparse.layout import TokenLayout

from .base import ModelAdapter, grid_5d


class WanAdapter(ModelAdapter):
    """Latent ``(B, C, F, H, W)`` patchified by ``config.patch_size`` (default (1, 2, 2)); frame-major tokens."""

    model_class = "WanTransformer3DModel"
    family = "Wan"
    self_attention = r"blocks\.\d+\.attn1"
    text_where = "none"

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        x = inputs["hidden_states"]
        t, h, w = grid_5d(x, tuple(model.config.patch_size))
        return TokenLayout(t, h, w, batch=x.shape[0])
