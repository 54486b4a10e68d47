"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): joint attention with the conditions as a suffix; sparse
calls take the processor's pairwise padding mask as a key-padding mask."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_sparse.layout import TokenLayout

from .base import ModelAdapter, grid_5d

_NATIVE = "diffusers.models.transformers.transformer_hunyuan_video15:HunyuanVideo15AttnProcessor2_0"


class HunyuanVideo15Adapter(ModelAdapter):
    """Latent ``(B, C, F, H, W)`` (65 channels: noisy latent, condition latent, mask); ``patch_size`` spatial,
    ``patch_size_t`` temporal (1 and 1 in every released config).

    Sparse: the self-attention of every dual-stream block (``transformer_blocks.i.attn``), over ``[video, conditions]``
    where the conditions are a suffix of ``image (SigLIP, 729) + ByT5 glyph text + Qwen text`` tokens, which the
    forward reorders per sample as ``[valid image, valid ByT5, valid Qwen, padding...]`` (text-to-video: the image
    tokens are all padding). Native: the token refiner's text self-attention (``AttnProcessor2_0``).

    Pitfall: the native processor builds a pairwise ``(B, 1, N, N)`` bool mask (``valid_q & valid_k``), not the
    ``(B, 1, 1, N)`` key mask dit_sparse's kernel takes (as ``kv_len``). Sparse calls use its row 0 (a video query,
    always valid), which is ``key < video_len + valid conditions`` (``pairwise_padding_mask``). Video outputs are
    unchanged; padded condition *queries* then attend to the valid keys instead of producing zeros, which changes
    only padded condition tokens, which no later query attends to and the output drops. Dense-by-policy calls go to
    the model's own processor with its own mask.
    """

    model_class = "HunyuanVideo15Transformer3DModel"
    family = "HunyuanVideo 1.5"
    self_attention = r"transformer_blocks\.\d+\.attn"
    native_processors = (
        (r"transformer_blocks\.\d+\.attn", _NATIVE),
        (r".*token_refiner.*", "diffusers.models.attention_processor:AttnProcessor2_0"),
    )
    text_where = "suffix"
    pairwise_padding_mask = True

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        x = inputs["hidden_states"]
        p, pt = model.config.patch_size, model.config.patch_size_t
        t, h, w = grid_5d(x, (pt, p, p))
        text = sum(
            inputs[k].shape[1]
            for k in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
            if inputs.get(k) is not None
        )
        return TokenLayout(t, h, w, text_len=text, text_where="suffix", batch=x.shape[0])
