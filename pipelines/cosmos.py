"""Cosmos 1.0 / Predict2 / Predict2.5 (``CosmosTransformer3DModel``): video-only self-attention, text by
cross-attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_sparse.layout import TokenLayout

from .base import ModelAdapter, grid_5d

_COSMOS = "diffusers.models.transformers.transformer_cosmos"


class CosmosAdapter(ModelAdapter):
    """Latent ``(B, C, F, H, W)`` patchified by ``config.patch_size`` (``(p_t, p_h, p_w)``, default (1, 2, 2)) into
    frame-major tokens (``CosmosPatchEmbed``).

    Sparse: ``transformer_blocks.i.attn1`` (legacy ``Attention`` with ``CosmosAttnProcessor2_0``; the forward passes
    it no attention mask). Native: ``transformer_blocks.i.attn2`` (cross-attention to the text, with the text
    ``attention_mask``; ``CosmosAttention`` with ``CosmosAttnProcessor2_5`` and image-context tokens when
    ``img_context_dim_in`` is set).

    The forward concatenates ``condition_mask`` (video2world) and, with ``concat_padding_mask`` (the default), the
    resized ``padding_mask`` to the latent as extra channels before patching: channels, never tokens, so the layout
    reads the grid of ``hidden_states`` as given. Resizing the padding mask needs torchvision (Diffusers' own
    requirement). The timestep is ``(B,)`` or, for Predict2 / 2.5 video2world, ``(B, 1, F, 1, 1)`` with the
    conditioning frames at a small constant timestep (``sigma_conditioning``, ``conditional_frame_timestep``): the
    tracker reads its largest value, the noisy frames' timestep, as long as that constant stays below the schedule.
    """

    model_class = "CosmosTransformer3DModel"
    family = "Cosmos"
    self_attention = r"transformer_blocks\.\d+\.attn1"
    native_processors = ((r".*", f"{_COSMOS}:CosmosAttnProcessor2_0"),)
    text_where = "none"

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        x = inputs["hidden_states"]
        t, h, w = grid_5d(x, tuple(model.config.patch_size))
        return TokenLayout(t, h, w, batch=x.shape[0])

    def native_processor(self, name: str, module: nn.Module) -> Any:
        """``CosmosAttnProcessor2_5`` for the image-context cross-attention (``CosmosAttention``), else
        ``CosmosAttnProcessor2_0`` (legacy ``Attention`` names no default processor)."""
        if type(module).__name__ == "CosmosAttention":
            from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_5

            return CosmosAttnProcessor2_5()
        return super().native_processor(name, module)
