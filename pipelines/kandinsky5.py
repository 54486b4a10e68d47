"""Kandinsky 5 (``Kandinsky5Transformer3DModel``): video self-attention, text by cross-attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_sparse.layout import TokenLayout

from .base import ModelAdapter


class Kandinsky5Adapter(ModelAdapter):
    """Latent ``(B, F, H, W, C)`` (channels last); ``patch_size`` ``(t, h, w)`` (``(1, 2, 2)`` in every released
    config). The visual tokens are frame-major (``fractal_flatten`` without a block mask: ``flatten(1, 3)``).

    Sparse: the visual blocks' self-attention ``visual_transformer_blocks.i.self_attention``. Native: the text
    encoder blocks' self-attention (``text_transformer_blocks.i.self_attention``, text only) and the visual blocks'
    text cross-attention (``cross_attention``).

    Pitfall: the model's own sparse attention (NABLA: ``attention_type="nabla"`` in the config, for which the pipeline
    passes ``sparse_params`` with ``to_fractal=True``) reorders the visual tokens into 8x8 spatial tiles before the
    blocks, and would hand SDPA a flex ``BlockMask``; dit_sparse replaces the dense self-attention only, so a forward
    given ``sparse_params`` is refused (build the transformer with ``attention_type="regular"``, or run NABLA without
    dit_sparse).
    """

    model_class = "Kandinsky5Transformer3DModel"
    family = "Kandinsky 5"
    self_attention = r"visual_transformer_blocks\.\d+\.self_attention"
    text_where = "none"

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        if inputs.get("sparse_params") is not None:
            raise ValueError(
                "Kandinsky5Transformer3DModel got sparse_params: its own NABLA sparse attention is on (it reorders "
                "the visual tokens into 8x8 tiles and masks attention itself); dit_sparse replaces the dense "
                "self-attention only: use a transformer with attention_type='regular' (sparse_params=None), or "
                "dit_sparse.remove(...) to run NABLA"
            )
        x = inputs["hidden_states"]
        if x.dim() != 5:
            raise ValueError(f"expected a (B, F, H, W, C) latent, got shape {tuple(x.shape)}")
        pt, ph, pw = model.config.patch_size
        _, f, h, w, _ = x.shape
        return TokenLayout(f // pt, h // ph, w // pw, batch=x.shape[0])
