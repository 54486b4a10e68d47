"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``): Wan's architecture with diffusion forcing (a timestep per latent
frame); video-only self-attention, text by cross-attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_sparse.layout import TokenLayout

from .wan import WanAdapter


class SkyReelsV2Adapter(WanAdapter):
    """Wan's layout (latent ``(B, C, F, H, W)`` patchified by ``config.patch_size``, frame-major tokens).

    Sparse: ``blocks.i.attn1``. Native: ``blocks.i.attn2`` (text; the image tokens of I2V configs as added
    key/values).

    Timestep: the diffusion-forcing pipelines pass a ``(B, F)`` timestep, one per latent frame. In their asynchronous
    mode (``ar_step > 0``) the frames that have not started stay at 999 for several iterations, so the largest
    timestep repeats and the tracker would take each iteration for the first step of a new generation (cache
    cleared, step counter stuck at 0). The timestep read here is the mean over frames (per sample), which falls at
    every iteration of the pipeline's step matrix: the step counter (and ``dense_steps``) counts the pipeline's
    iterations, which in the asynchronous mode outnumber ``num_inference_steps`` (a default warm-up, scaled from 50
    steps to ``num_inference_steps``, then covers a smaller share of the generation: give ``dense_steps`` in
    iterations). ``StepContext.timestep`` is that mean. A 1-D timestep is read as given.

    Pitfall: with ``num_frame_per_block > 1`` (the diffusion-forcing pipelines' ``causal_block_size``, set through
    ``transformer._set_ar_attention``) the forward gives every ``attn1`` a block-causal boolean ``(1, 1, N, N)``
    attention mask, which reaches SDPA. dit_sparse's kernels cannot honour it, so such a forward raises a clear
    error before it runs (the processor itself refuses any attention mask other than a key-padding one: a mask is
    never dropped).
    """

    model_class = "SkyReelsV2Transformer3DModel"
    family = "SkyReels-V2"

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        frames_per_block = model.config.num_frame_per_block
        if frames_per_block > 1:
            raise NotImplementedError(
                f"dit_sparse: this SkyReelsV2Transformer3DModel has num_frame_per_block={frames_per_block} "
                "(causal_block_size of the diffusion-forcing pipelines), so its self-attention gets a block-causal "
                "attention mask, which sparse attention cannot honour; use causal_block_size=1 (and "
                "transformer._set_ar_attention(1) if it was set), or dit_sparse.remove(...) for causal generation"
            )
        return super().layout(model, inputs)

    def timestep(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The forward's timestep; a ``(B, F)`` one as its mean over frames, ``(B,)``."""
        t = super().timestep(inputs)
        return t.float().mean(dim=-1) if t is not None and t.dim() == 2 else t
