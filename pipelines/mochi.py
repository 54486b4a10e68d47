"""Mochi (``MochiTransformer3DModel``): joint attention with the text as a suffix, padded text dropped per sample."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_sparse.layout import TokenLayout

from .base import ModelAdapter, grid_5d


class MochiAdapter(ModelAdapter):
    """Latent ``(B, C, F, H, W)`` patchified spatially by ``patch_size`` (frames unchanged).

    ``MochiAttnProcessor2_0`` loops over the batch and calls SDPA on ``[video, valid text]`` of one sample, so a
    call holds ``video_len + valid_b`` tokens and batch 1. The transformer has no ``set_attn_processor``:
    processors are set as ``module.processor``.
    """

    model_class = "MochiTransformer3DModel"
    family = "Mochi"
    self_attention = r"transformer_blocks\.\d+\.attn1"
    native_processors = ((r".*", "diffusers.models.attention_processor:MochiAttnProcessor2_0"),)
    text_where = "suffix"
    trims_text = True

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        x, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        p = model.config.patch_size
        t, h, w = grid_5d(x, (1, p, p))
        return TokenLayout(t, h, w, text_len=text.shape[1], text_where="suffix", batch=x.shape[0])
