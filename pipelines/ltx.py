"""LTX-Video (``LTXVideoTransformer3DModel``): video-only self-attention, text by cross-attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_sparse.layout import TokenLayout

from .base import ModelAdapter


class LTXAdapter(ModelAdapter):
    """Tokens arrive packed ``(B, N, C)`` (frame-major); the forward's ``num_frames/height/width`` give the latent
    grid, divided by ``patch_size_t`` / ``patch_size`` (1 in every released config)."""

    model_class = "LTXVideoTransformer3DModel"
    family = "LTX-Video"
    self_attention = r"transformer_blocks\.\d+\.attn1"
    text_where = "none"

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        x = inputs["hidden_states"]
        missing = [k for k in ("num_frames", "height", "width") if inputs.get(k) is None]
        if missing:
            raise ValueError(
                f"{self.model_class}.forward needs {', '.join(missing)} (latent sizes, as its pipeline passes them) "
                "for dit_sparse's layout"
            )
        p, pt = model.config.patch_size, model.config.patch_size_t
        layout = TokenLayout(
            int(inputs["num_frames"]) // pt, int(inputs["height"]) // p, int(inputs["width"]) // p, batch=x.shape[0]
        )
        if layout.video_len != x.shape[1]:
            raise ValueError(
                f"{self.family} grid {layout.grid} from num_frames/height/width holds {layout.video_len} tokens but "
                f"hidden_states has {x.shape[1]}"
            )
        return layout
