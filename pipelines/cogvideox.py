"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``): joint attention with the text as a prefix."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_sparse.layout import TokenLayout

from .base import ModelAdapter, grid_5d


class CogVideoXAdapter(ModelAdapter):
    """Latent ``(B, F, C, H, W)`` (frames before channels); ``patch_size`` spatial, ``patch_size_t`` (1.5) temporal.

    The processor joins ``[text, video]`` (``text_len = encoder_hidden_states.shape[1]``) and calls
    ``F.scaled_dot_product_attention`` directly; pipelines batch CFG (unconditional half first).
    """

    model_class = "CogVideoXTransformer3DModel"
    family = "CogVideoX"
    self_attention = r"transformer_blocks\.\d+\.attn1"
    native_processors = ((r".*", "diffusers.models.attention_processor:CogVideoXAttnProcessor2_0"),)
    text_where = "prefix"

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        x, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        t, h, w = grid_5d(x, (pt, p, p), channels_first=False)
        return TokenLayout(t, h, w, text_len=text.shape[1], text_where="prefix", batch=x.shape[0])
