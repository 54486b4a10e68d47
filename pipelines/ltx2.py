"""LTX-2 (``LTX2VideoTransformer3DModel``): joint audio/video; only the video self-attention runs sparse."""

from __future__ import annotations

from .ltx import LTXAdapter


class LTX2Adapter(LTXAdapter):
    """Video tokens arrive packed ``(B, N, C)``, frame-major as ``LTX2Pipeline._pack_latents`` packs them; the
    forward's ``num_frames / height / width`` (latent sizes, which the pipeline always passes) give the grid, divided
    by ``patch_size_t`` / ``patch_size`` (1 in every released config), as for LTX-Video.

    Sparse: the video self-attention ``transformer_blocks.i.attn1``. Native: the audio self-attention
    (``audio_attn1``), the text cross-attentions (``attn2``, ``audio_attn2``), the audio<->video cross-attentions
    (``audio_to_video_attn``, ``video_to_audio_attn``) and the text connectors' attention.

    Pitfalls: a forward given only ``video_coords`` (no ``num_frames/height/width``) is refused (the grid is not
    derived from RoPE coordinates); ``video_self_attention_mask`` (IC-LoRA) is an additive float mask, which the
    processor refuses with a clear error; spatio-temporal guidance (``perturbed_attn`` configs, LTX-2.3): a
    perturbed sample's attention output is replaced by its values after the (sparse) call, but a block whose whole
    batch is perturbed makes no SDPA call at all, which dit_sparse reports as an error (STG passes are unsupported).
    """

    model_class = "LTX2VideoTransformer3DModel"
    family = "LTX-2"
