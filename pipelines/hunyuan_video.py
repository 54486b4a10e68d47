"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint attention with the text as a suffix, padded text masked."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_sparse.layout import TokenLayout

from .base import ModelAdapter, grid_5d


class HunyuanVideoAdapter(ModelAdapter):
    """Latent ``(B, C, F, H, W)``; ``patch_size`` spatial, ``patch_size_t`` temporal.

    Dual-stream (``transformer_blocks.i.attn``) and single-stream (``single_transformer_blocks.i.attn``) blocks
    attend ``[video, text]``; the forward builds a ``(B, 1, 1, N)`` bool key mask that keeps the first
    ``video_len + encoder_attention_mask.sum()`` keys, which the processor hands to the kernel as ``kv_len``.
    The text token refiner's attention (text only) keeps its own ``AttnProcessor2_0``.
    """

    model_class = "HunyuanVideoTransformer3DModel"
    family = "HunyuanVideo"
    self_attention = r"(single_)?transformer_blocks\.\d+\.attn"
    native_processors = (
        (
            r"(single_)?transformer_blocks\.\d+\.attn",
            "diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoAttnProcessor2_0",
        ),
        (r".*token_refiner.*", "diffusers.models.attention_processor:AttnProcessor2_0"),
    )
    text_where = "suffix"
    key_padding_mask = True

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        x, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        p, pt = model.config.patch_size, model.config.patch_size_t
        t, h, w = grid_5d(x, (pt, p, p))
        return TokenLayout(t, h, w, text_len=text.shape[1], text_where="suffix", batch=x.shape[0])
