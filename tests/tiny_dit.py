"""Tiny random video transformers of the five supported families (Diffusers' own test sizes, larger latent grids
so that sparse plans have several blocks) and their forward inputs. No downloads."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

FAMILIES = ("wan", "cogvideox", "hunyuan_video", "ltx", "mochi")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wan(batch: int = 1) -> tuple[nn.Module, dict[str, Any]]:
    """Grid 4×8×8 = 256 video tokens, text by cross-attention."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip
    g = _gen(1)
    inputs = {
        "hidden_states": torch.randn(batch, 16, 4, 16, 16, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g),
        "return_dict": False,
    }
    return model, inputs


def cogvideox(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """CogVideoX 1.5-style (RoPE, patch_size_t=2): grid 2×8×8 = 128 video tokens after 16 text tokens (prefix)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
    ).eval()  # fmt: skip
    g = _gen(2)
    n_video = 2 * 8 * 8
    inputs = {
        "hidden_states": torch.randn(batch, 4, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "image_rotary_emb": (torch.randn(n_video, 16, generator=g), torch.randn(n_video, 16, generator=g)),
        "return_dict": False,
    }
    return model, inputs


def hunyuan_video(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """Grid 4×8×8 = 256 video tokens then 12 text tokens (suffix), padded differently per sample."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()  # fmt: skip
    g = _gen(3)
    mask = torch.ones(batch, 12, dtype=torch.long)
    mask[0, 9:] = 0
    if batch > 1:
        mask[1, 5:] = 0
    inputs = {
        "hidden_states": torch.randn(batch, 4, 4, 8, 8, generator=g),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, 12, 16, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "guidance": torch.full((batch,), 3.0),
        "return_dict": False,
    }
    return model, inputs


def ltx(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """Packed tokens of a 4×8×8 latent grid, text by cross-attention."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32,
    ).eval()  # fmt: skip
    g = _gen(4)
    inputs = {
        "hidden_states": torch.randn(batch, 4 * 8 * 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_attention_mask": torch.ones(batch, 16, dtype=torch.long),
        "num_frames": 4,
        "height": 8,
        "width": 8,
        "return_dict": False,
    }
    return model, inputs


def mochi(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """Grid 4×8×8 = 256 video tokens then up to 16 text tokens (suffix), padded text dropped per sample."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ).eval()  # fmt: skip
    g = _gen(5)
    mask = torch.ones(batch, 16, dtype=torch.long)
    mask[0, 11:] = 0
    if batch > 1:
        mask[1, 6:] = 0
    inputs = {
        "hidden_states": torch.randn(batch, 12, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }
    return model, inputs


BUILDERS: dict[str, Callable[..., tuple[nn.Module, dict[str, Any]]]] = {
    "wan": wan,
    "cogvideox": cogvideox,
    "hunyuan_video": hunyuan_video,
    "ltx": ltx,
    "mochi": mochi,
}


def run(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def wan_pipeline(transformer: nn.Module | None = None, **components: Any) -> Any:
    """A text-encoder-free WanPipeline around a tiny Wan transformer (``BUILDERS["wan"]`` unless given); extra
    components (``transformer_2``, ``boundary_ratio``) are passed through."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    if transformer is None:
        transformer, _ = wan()
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **components,
    )  # fmt: skip


def generate_latents(pipe: Any, steps: int = 2) -> torch.Tensor:
    """Latents of one seeded CFG generation (13 frames at 128x128: 4 x 8 x 8 = 256 video tokens per call)."""
    g = _gen(0)
    return pipe(
        prompt_embeds=torch.randn(1, 16, 32, generator=g), negative_prompt_embeds=torch.randn(1, 16, 32, generator=g),
        height=128, width=128, num_frames=13, num_inference_steps=steps, guidance_scale=6.0, output_type="latent",
        generator=g,
    ).frames  # fmt: skip


@contextlib.contextmanager
def applied(target: Any, method: str, **params: Any) -> Iterator[None]:
    """``dit_sparse.apply(target, method, **params)`` for the body of the ``with``, then ``dit_sparse.remove``."""
    import dit_sparse

    dit_sparse.apply(target, method, **params)
    try:
        yield
    finally:
        dit_sparse.remove(target)


def wan_ti2v(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """Wan 2.2 TI2V-5B-shaped: 48 latent channels (its VAE's z_dim), patch (1, 2, 2), per-token timesteps as the
    pipeline's ``expand_timesteps`` passes them; odd grid 3×5×7 = 105 video tokens."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip
    g = _gen(6)
    inputs = {
        "hidden_states": torch.randn(batch, 48, 3, 10, 14, generator=g),
        "timestep": torch.full((batch, 3 * 5 * 7), 500.0),
        "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g),
        "return_dict": False,
    }
    return model, inputs


def wan_i2v(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """Wan 2.1 / 2.2 I2V-shaped: ``image_dim`` set, so ``attn2`` takes the image tokens as added key/values
    (cross-attention); odd grid 3×5×7 = 105 video tokens, 36 input channels (latent + mask + image latent)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=16, added_kv_proj_dim=24,
    ).eval()  # fmt: skip
    g = _gen(7)
    inputs = {
        "hidden_states": torch.randn(batch, 36, 3, 10, 14, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g),
        "encoder_hidden_states_image": torch.randn(batch, 9, 16, generator=g),
        "return_dict": False,
    }
    return model, inputs


def wan_vace(batch: int = 2, control_frames: int = 3) -> tuple[nn.Module, dict[str, Any]]:
    """Wan 2.1 VACE-shaped: 3 blocks, VACE blocks at layers 0 and 2, 48 control channels (the pipeline's 96 halved);
    odd grid 3×5×7 = 105 video tokens; ``control_frames`` < 3 gives control latents the forward zero-pads."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=48,
    ).eval()  # fmt: skip
    g = _gen(8)
    inputs = {
        "hidden_states": torch.randn(batch, 16, 3, 10, 14, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g),
        "control_hidden_states": torch.randn(batch, 48, control_frames, 10, 14, generator=g),
        "control_hidden_states_scale": torch.tensor([1.0, 0.5]),
        "return_dict": False,
    }
    return model, inputs


def skyreels_v2(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """SkyReels-V2 diffusion-forcing-shaped: a ``(B, F)`` timestep (one per latent frame, as the DF pipelines pass it
    with ``enable_diffusion_forcing=True``); odd grid 3×5×7 = 105 video tokens. No ``inject_sample_info``: its fps
    term only broadcasts at batch 1 in diffusion-forcing mode (Diffusers 0.42.1)."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip
    g = _gen(9)
    inputs = {
        "hidden_states": torch.randn(batch, 16, 3, 10, 14, generator=g),
        "timestep": torch.tensor([[800.0, 900.0, 999.0]] * batch),
        "encoder_hidden_states": torch.randn(batch, 16, 32, generator=g),
        "enable_diffusion_forcing": True,
        "return_dict": False,
    }
    return model, inputs


def cosmos(batch: int = 2, video2world: bool = False, img_context: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Cosmos-shaped: patch (1, 2, 2), learnable extra position embedding, text by cross-attention with a padded text
    mask; odd grid 3×5×7 = 105 video tokens. ``video2world``: Predict2 / 2.5-style, a ``condition_mask`` channel
    (first frame conditioning) and a ``(B, 1, F, 1, 1)`` timestep. ``img_context``: Predict2.5-style image context
    (``CosmosAttention`` cross-attention, text and 4 image tokens as a tuple, no text mask: its processor takes a
    pair of masks that the forward never builds). ``concat_padding_mask=False``: resizing the padding mask needs
    torchvision."""
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    image = {"img_context_dim_in": 8, "img_context_num_tokens": 4, "img_context_dim_out": 24} if img_context else {}
    model = CosmosTransformer3DModel(
        in_channels=4 + video2world, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable", **image,
    ).eval()  # fmt: skip
    g = _gen(10)
    text_mask = torch.ones(batch, 12, dtype=torch.bool)  # SDPA reads a float mask as an additive bias
    text_mask[0, 9:] = False
    text = torch.randn(batch, 12, 16, generator=g)
    inputs: dict[str, Any] = {
        "hidden_states": torch.randn(batch, 4, 3, 10, 14, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "encoder_hidden_states": (text, torch.randn(batch, 4, 8, generator=g)) if img_context else text,
        "attention_mask": None if img_context else text_mask,
        "fps": 30,
        "return_dict": False,
    }
    if video2world:
        cond = torch.zeros(batch, 1, 3, 1, 1)
        cond[:, :, 0] = 1.0
        inputs["condition_mask"] = cond.expand(batch, 1, 3, 10, 14).contiguous()
        inputs["timestep"] = cond * 1e-4 + (1 - cond) * 0.5
    return model, inputs


def flux_image() -> tuple[nn.Module, dict[str, Any]]:
    """A Diffusers transformer dit_sparse does not support: Flux's image transformer (no video token layout), 16
    packed latent tokens joined with 5 text tokens; its attention modules name their default processor."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip
    g = _gen(11)
    inputs = {
        "hidden_states": torch.randn(1, 16, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(5, 3),
        "return_dict": False,
    }
    return model, inputs


# ---------------------------------------------------------------- HunyuanVideo 1.5, LTX-2, Kandinsky 5 (adapt2)


def hunyuan_video15(batch: int = 2, image: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Odd grid 3×5×7 = 105 video tokens, then 5 image + 6 ByT5 + 12 Qwen condition tokens (suffix), padded
    differently per sample; ``image=False`` is text-to-video (zero image embeds: the image tokens are padding)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(4, 6, 6),
        task_type="i2v" if image else "t2v",
    ).eval()  # fmt: skip
    g = _gen(8)
    mask = torch.ones(batch, 12, dtype=torch.long)
    mask_2 = torch.zeros(batch, 6, dtype=torch.long)
    mask[0, 9:], mask_2[0, :4] = 0, 1
    if batch > 1:
        mask[1, 5:], mask_2[1, :1] = 0, 1
    inputs = {
        "hidden_states": torch.randn(batch, 4, 3, 5, 7, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 12, 16, generator=g),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": torch.randn(batch, 6, 8, generator=g),
        "encoder_attention_mask_2": mask_2,
        "image_embeds": torch.randn(batch, 5, 12, generator=g) if image else torch.zeros(batch, 5, 12),
        "return_dict": False,
    }
    return model, inputs


def ltx2(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """Diffusers' LTX-2 test sizes (``convert_ltx2_to_diffusers.py`` "test"); packed video tokens of an odd 3×5×7
    latent grid, 9 audio tokens, text by cross-attention."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=16, rope_double_precision=False,
        cross_attn_timestep_scale_multiplier=1,
    ).eval()  # fmt: skip
    g = _gen(9)
    inputs = {
        "hidden_states": torch.randn(batch, 3 * 5 * 7, 4, generator=g),
        "audio_hidden_states": torch.randn(batch, 9, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
        "audio_encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_attention_mask": torch.ones(batch, 8, dtype=torch.long),
        "audio_encoder_attention_mask": torch.ones(batch, 8, dtype=torch.long),
        "num_frames": 3,
        "height": 5,
        "width": 7,
        "audio_num_frames": 9,
        "return_dict": False,
    }
    return model, inputs


def kandinsky5(batch: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """Latent (B, 3, 10, 14, 4), patch (1, 2, 2): odd grid 3×5×7 = 105 visual tokens, 8 text tokens by
    cross-attention. The modulation layers (zero-initialised by the model) get random weights, so that every
    attention output reaches the model output."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
    ).eval()  # fmt: skip
    for name, p in model.named_parameters():
        if "modulation" in name:
            p.data.normal_(0.0, 0.2)
    g = _gen(10)
    inputs = {
        "hidden_states": torch.randn(batch, 3, 10, 14, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "visual_rope_pos": [torch.arange(3), torch.arange(5), torch.arange(7)],
        "text_rope_pos": torch.arange(8),
        "return_dict": True,  # with False the forward returns the bare tensor, not a tuple
    }
    return model, inputs
