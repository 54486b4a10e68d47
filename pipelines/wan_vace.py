"""Wan 2.1 VACE (``WanVACETransformer3DModel``): the video stream and the VACE control stream both attend the video's
token grid; text by cross-attention."""

from __future__ import annotations

from .wan import WanAdapter


class WanVACEAdapter(WanAdapter):
    """Wan's layout (latent ``(B, C, F, H, W)`` patchified by ``config.patch_size``, frame-major tokens) for the main
    blocks' ``attn1`` and the ``vace_blocks``' ``attn1``.

    Sparse: ``blocks.i.attn1`` (video self-attention) and ``vace_blocks.j.attn1`` (control self-attention). The
    forward patchifies the control latents with the same patch size, zero-pads them at the end to the video's token
    count and gives them the video's RoPE, so the control stream has the video's grid and length. Native: every
    ``attn2`` (cross-attention to the text, and to the image tokens of I2V configs).

    Pitfall: self-attention layers are numbered in module order, the main blocks first, then the VACE blocks (which
    run first in the forward): ``dense_layers=k`` keeps the first ``k`` main blocks dense, not the VACE blocks.
    """

    model_class = "WanVACETransformer3DModel"
    family = "Wan VACE"
    self_attention = r"(vace_)?blocks\.\d+\.attn1"
