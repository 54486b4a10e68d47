"""The model zoo of the end-to-end benchmark: full-size transformers from their published Diffusers configs, built
with random weights, and their inputs at the real shapes (made the way each family's pipeline makes them)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Shape = tuple[int, int, int]  # (frames, height, width) in pixels
MakeInputs = Callable[[Any, Shape, torch.device, torch.dtype], tuple[dict[str, Any], int]]


@dataclass(frozen=True)
class ModelSpec:
    """A full-size transformer: its Diffusers class, published config, and how to make inputs of a named shape.

    Attributes:
        cls_name: the Diffusers class (``diffusers.<cls_name>``).
        config: the published config (constructor kwargs), unchanged.
        shapes: shape name -> (frames, height, width) in pixels.
        make_inputs: (model, shape, device, dtype) -> (forward kwargs, self-attention sequence length).
        layers_attr: attribute holding the (first) block list.
        note: printed with the results (what is timed, input choices).
        subset: config overrides that the benchmark times instead of the full model (e.g. ``{"num_layers": 10}``).
        quick_subset: overrides used by ``quick=True`` on top of ``subset``.
        source: where the config values come from.
    """

    cls_name: str
    config: dict[str, Any]
    shapes: dict[str, Shape]
    make_inputs: MakeInputs
    layers_attr: str = "blocks"
    note: str = ""
    subset: dict[str, Any] = field(default_factory=dict)
    quick_subset: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def build_config(self, quick: bool = False) -> dict[str, Any]:
        """The config that is built: the published one with ``subset`` (and ``quick_subset``) applied."""
        return {**self.config, **self.subset, **(self.quick_subset if quick else {})}

    def describe(self, quick: bool = False) -> str:
        """The note printed with the results: the timed subset (if any) and ``note``."""
        cfg = self.build_config(quick)
        parts = [f"{k}={cfg[k]} of {self.config.get(k)}" for k in cfg if cfg[k] != self.config.get(k)]
        text = f"timed subset: {', '.join(parts)} (random weights)" if parts else "full model (random weights)"
        return f"{text}; {self.note}" if self.note else text


# ------------------------------------------------------------------------------------------------ inputs per family


def _wan_inputs(
    model: Any,
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    *,
    spatial: int = 8,
    expand_timesteps: bool = False,
) -> tuple[dict[str, Any], int]:
    """WanPipeline: latent (B, C, (F-1)/4+1, H/spatial, W/spatial), 512 text tokens (cross-attention only).

    ``spatial``: the VAE's spatial factor (8; Wan 2.2 TI2V-5B's VAE: 16). ``expand_timesteps``: one timestep per
    video token, ``(B, tokens)``, as the pipeline passes them for TI2V-5B (``WanPipeline(expand_timesteps=True)``).
    """
    frames, height, width = shape
    cfg = model.config
    lat = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // spatial, width // spatial)
    pt, ph, pw = cfg.patch_size
    tokens = (lat[2] // pt) * (lat[3] // ph) * (lat[4] // pw)
    inputs = {
        "hidden_states": torch.randn(lat, device=device, dtype=dtype),
        "timestep": torch.full((1, tokens) if expand_timesteps else (1,), 999.0, device=device),
        "encoder_hidden_states": torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype),
        "return_dict": False,
    }
    return inputs, tokens


def _cogvideox_inputs(model: Any, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    """CogVideoXPipeline: latent (B, F', C, H/8, W/8) with F' padded to a multiple of ``patch_size_t``; RoPE tables
    from the pipeline's own ``_prepare_rotary_positional_embeddings`` (a pipeline holding only this transformer: with
    no VAE it uses the real scale factors 8 and 4); ``max_text_seq_length`` text tokens joined as a prefix."""
    from diffusers import CogVideoXPipeline

    frames, height, width = shape
    cfg = model.config
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    pt = cfg.patch_size_t or 1
    latent_frames += -latent_frames % pt  # the pipeline pads the latent frames for CogVideoX 1.5
    s, p = pipe.vae_scale_factor_spatial, cfg.patch_size
    rope = None
    if cfg.use_rotary_positional_embeddings:
        rope = pipe._prepare_rotary_positional_embeddings(height, width, latent_frames, device)
    inputs = {
        "hidden_states": torch.randn(
            1, latent_frames, cfg.in_channels, height // s, width // s, device=device, dtype=dtype
        ),
        "encoder_hidden_states": torch.randn(
            1, cfg.max_text_seq_length, cfg.text_embed_dim, device=device, dtype=dtype
        ),
        "timestep": torch.tensor([999], device=device),
        "image_rotary_emb": rope,
        "return_dict": False,
    }
    video = (latent_frames // pt) * (height // s // p) * (width // s // p)
    return inputs, cfg.max_text_seq_length + video


HUNYUAN_TEXT_TOKENS = 256  # HunyuanVideoPipeline max_sequence_length (after cropping the prompt template)
HUNYUAN_PROMPT_TOKENS = 64  # valid (unpadded) prompt tokens; the other text keys are masked as padding


def _hunyuan_inputs(model: Any, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    """HunyuanVideoPipeline: latent (B, C, (F-1)/4+1, H/8, W/8); 256 text tokens joined as a suffix with a padding
    mask (first ``HUNYUAN_PROMPT_TOKENS`` valid); CLIP pooled projection; distilled guidance 6.0 x 1000."""
    frames, height, width = shape
    cfg = model.config
    lat = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    mask = torch.zeros(1, HUNYUAN_TEXT_TOKENS, device=device, dtype=dtype)
    mask[:, :HUNYUAN_PROMPT_TOKENS] = 1
    inputs = {
        "hidden_states": torch.randn(lat, device=device, dtype=dtype),
        "timestep": torch.tensor([999.0], device=device),
        "encoder_hidden_states": torch.randn(1, HUNYUAN_TEXT_TOKENS, cfg.text_embed_dim, device=device, dtype=dtype),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype),
        "guidance": torch.tensor([6.0 * 1000.0], device=device, dtype=dtype),
        "return_dict": False,
    }
    p, pt = cfg.patch_size, cfg.patch_size_t
    video = (lat[2] // pt) * (lat[3] // p) * (lat[4] // p)
    return inputs, video + HUNYUAN_TEXT_TOKENS


HUNYUAN15_TEXT_TOKENS = 1000  # HunyuanVideo15Pipeline tokenizer_max_length (Qwen2.5-VL, after the template crop)
HUNYUAN15_GLYPH_TOKENS = 256  # tokenizer_2_max_length (ByT5 glyph text; all padding for a prompt without quotes)
HUNYUAN15_IMAGE_TOKENS = 729  # vision_num_semantic_tokens (SigLIP; zeros, i.e. padding, for text-to-video)


def _hunyuan15_inputs(model: Any, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    """HunyuanVideo15Pipeline (text-to-video): latent (B, 65, (F-1)/4+1, H/16, W/16) (noise, condition latent, mask);
    the conditions join the video as a suffix of 729 image + 256 ByT5 + 1000 Qwen tokens, of which the first
    ``HUNYUAN_PROMPT_TOKENS`` Qwen tokens are valid and the rest masked as padding (zero image embeds, no glyph
    text)."""
    frames, height, width = shape
    cfg = model.config
    lat = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // 16, width // 16)
    mask = torch.zeros(1, HUNYUAN15_TEXT_TOKENS, device=device, dtype=torch.long)
    mask[:, :HUNYUAN_PROMPT_TOKENS] = 1
    inputs = {
        "hidden_states": torch.randn(lat, device=device, dtype=dtype),
        "timestep": torch.tensor([999.0], device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, HUNYUAN15_TEXT_TOKENS, cfg.text_embed_dim, device=device, dtype=dtype),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": torch.randn(
            1, HUNYUAN15_GLYPH_TOKENS, cfg.text_embed_2_dim, device=device, dtype=dtype
        ),
        "encoder_attention_mask_2": torch.zeros(1, HUNYUAN15_GLYPH_TOKENS, device=device, dtype=torch.long),
        "image_embeds": torch.zeros(1, HUNYUAN15_IMAGE_TOKENS, cfg.image_embed_dim, device=device, dtype=dtype),
        "return_dict": False,
    }
    p, pt = cfg.patch_size, cfg.patch_size_t
    video = (lat[2] // pt) * (lat[3] // p) * (lat[4] // p)
    return inputs, video + HUNYUAN15_IMAGE_TOKENS + HUNYUAN15_GLYPH_TOKENS + HUNYUAN15_TEXT_TOKENS


LTX2_TEXT_TOKENS = 1024  # LTX2Pipeline max_sequence_length (the text connectors keep the length)
LTX2_FPS = 24.0  # LTX2Pipeline frame_rate


def _ltx2_inputs(model: Any, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    """LTX2Pipeline: packed video tokens of the latent ((F-1)/8+1, H/32, W/32), audio latent frames
    ``round(F / fps * 16000 / 160 / 4)`` packed with 8 channels x 16 mel bins, 1024 text tokens for each stream
    (cross-attention only); the forward gets the latent sizes as ``num_frames/height/width``."""
    frames, height, width = shape
    cfg = model.config
    latent = ((frames - 1) // 8 + 1, height // 32, width // 32)
    audio_frames = round(frames / LTX2_FPS * 16000 / 160 / 4)
    video = latent[0] * latent[1] * latent[2]
    ones = torch.ones(1, LTX2_TEXT_TOKENS, device=device, dtype=torch.long)
    inputs = {
        "hidden_states": torch.randn(1, video, cfg.in_channels, device=device, dtype=dtype),
        "audio_hidden_states": torch.randn(1, audio_frames, cfg.audio_in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, LTX2_TEXT_TOKENS, cfg.caption_channels, device=device, dtype=dtype),
        "audio_encoder_hidden_states": torch.randn(
            1, LTX2_TEXT_TOKENS, cfg.caption_channels, device=device, dtype=dtype
        ),
        "timestep": torch.tensor([999.0], device=device),
        "encoder_attention_mask": ones,
        "audio_encoder_attention_mask": ones,
        "num_frames": latent[0],
        "height": latent[1],
        "width": latent[2],
        "fps": LTX2_FPS,
        "audio_num_frames": audio_frames,
        "return_dict": False,
    }
    return inputs, video


# ------------------------------------------------------------------------------------------------ published configs


def _wan_config(heads: int, ffn: int, layers: int) -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


_WAN_SOURCE = "diffusers scripts/convert_wan_to_diffusers.py (Wan-T2V-1.3B / Wan-T2V-14B diffusers_config)"
_WAN_SHAPES: dict[str, Shape] = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}

COGVIDEOX15_5B: dict[str, Any] = dict(
    num_attention_heads=48,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=512,
    ofs_embed_dim=None,
    text_embed_dim=4096,
    num_layers=42,
    dropout=0.0,
    attention_bias=True,
    sample_width=300,
    sample_height=300,
    sample_frames=81,
    patch_size=2,
    patch_size_t=2,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=False,
    patch_bias=False,
)

HUNYUAN_VIDEO: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
    image_condition_type=None,
)

WAN22_TI2V_5B: dict[str, Any] = dict(
    _wan_config(24, 14336, 30),
    in_channels=48,
    out_channels=48,
)

HUNYUAN_VIDEO15_480P_T2V: dict[str, Any] = dict(
    in_channels=65,
    out_channels=32,
    num_attention_heads=16,
    attention_head_dim=128,
    num_layers=54,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=1,
    patch_size_t=1,
    qk_norm="rms_norm",
    text_embed_dim=3584,
    text_embed_2_dim=1472,
    image_embed_dim=1152,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
    use_meanflow=False,
    target_size=640,
    task_type="t2v",
)

LTX2: dict[str, Any] = dict(
    in_channels=128,
    out_channels=128,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=32,
    attention_head_dim=128,
    cross_attention_dim=4096,
    vae_scale_factors=(8, 32, 32),
    pos_embed_max_pos=20,
    base_height=2048,
    base_width=2048,
    audio_in_channels=128,
    audio_out_channels=128,
    audio_patch_size=1,
    audio_patch_size_t=1,
    audio_num_attention_heads=32,
    audio_attention_head_dim=64,
    audio_cross_attention_dim=2048,
    audio_scale_factor=4,
    audio_pos_embed_max_pos=20,
    audio_sampling_rate=16000,
    audio_hop_length=160,
    num_layers=48,
    activation_fn="gelu-approximate",
    qk_norm="rms_norm_across_heads",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    caption_channels=3840,
    attention_bias=True,
    attention_out_bias=True,
    rope_theta=10000.0,
    rope_double_precision=True,
    causal_offset=1,
    timestep_scale_multiplier=1000,
    cross_attn_timestep_scale_multiplier=1000,
    rope_type="split",
)

MODELS: dict[str, ModelSpec] = {
    "wan2.1-1.3b": ModelSpec(
        "WanTransformer3DModel",
        _wan_config(12, 8960, 30),
        _WAN_SHAPES,
        _wan_inputs,
        source=_WAN_SOURCE,
    ),
    "wan2.1-14b": ModelSpec(
        "WanTransformer3DModel",
        _wan_config(40, 13824, 40),
        _WAN_SHAPES,
        _wan_inputs,
        note="the full model takes ~8 s per forward at 720p on an H100; all blocks are identical, so a per-forward "
        "speedup of the subset slightly understates the full model's (embeddings/head weigh more)",
        subset={"num_layers": 10},
        quick_subset={"num_layers": 4},
        source=_WAN_SOURCE,
    ),
    "cogvideox1.5-5b": ModelSpec(
        "CogVideoXTransformer3DModel",
        COGVIDEOX15_5B,
        {"768x1360": (81, 768, 1360)},
        _cogvideox_inputs,
        layers_attr="transformer_blocks",
        note="T2V at 1360x768 (the resolution the T2V checkpoint was trained at), 81 frames -> 21 latent frames padded "
        "to 22 as the pipeline does -> 11 x 48 x 85 = 44,880 video tokens after 226 text tokens",
        quick_subset={"num_layers": 10},
        source="diffusers scripts/convert_cogvideox_to_diffusers.py get_transformer_init_kwargs('1.5') + 5B args "
        "(num_layers 42, num_attention_heads 48, RoPE); other values: CogVideoXTransformer3DModel defaults; "
        "THUDM/CogVideoX1.5-5B transformer/config.json",
    ),
    "hunyuanvideo": ModelSpec(
        "HunyuanVideoTransformer3DModel",
        HUNYUAN_VIDEO,
        {"720p": (129, 720, 1280)},
        _hunyuan_inputs,
        layers_attr="transformer_blocks",
        note="the full model (20 dual + 40 single blocks) takes ~20 s per forward on an H100; the subset keeps the "
        "1:2 dual:single ratio; 720p/129 frames -> 33 x 45 x 80 = 118,800 video tokens + 256 text tokens (suffix, "
        f"{HUNYUAN_PROMPT_TOKENS} valid, rest masked as padding)",
        subset={"num_layers": 2, "num_single_layers": 4},
        quick_subset={"num_layers": 1, "num_single_layers": 2},
        source="HunyuanVideoTransformer3DModel defaults, which diffusers scripts/convert_hunyuan_video_to_diffusers.py "
        "loads the published checkpoint into (strict); hunyuanvideo-community/HunyuanVideo transformer/config.json",
    ),
    "wan2.2-ti2v-5b": ModelSpec(
        "WanTransformer3DModel",
        WAN22_TI2V_5B,
        {"720p": (121, 704, 1280)},
        functools.partial(_wan_inputs, spatial=16, expand_timesteps=True),
        note="T2V at the pipeline's default 704x1280, 121 frames -> latent 31 x 44 x 80 (VAE 16x spatial) -> "
        "31 x 22 x 40 = 27,280 video tokens; one timestep per token (expand_timesteps)",
        quick_subset={"num_layers": 10},
        source="diffusers scripts/convert_wan_to_diffusers.py (model_type 'Wan2.2-TI2V-5B' diffusers_config; "
        "rope_max_seq_len: WanTransformer3DModel default); Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    ),
    "hunyuanvideo1.5": ModelSpec(
        "HunyuanVideo15Transformer3DModel",
        HUNYUAN_VIDEO15_480P_T2V,
        {"480p": (121, 480, 848)},
        _hunyuan15_inputs,
        layers_attr="transformer_blocks",
        note="480p T2V at the pipeline's default (121 frames, 480x848 from target_size 640 at 16:9) -> "
        "31 x 30 x 53 = 49,290 video tokens + 1,985 condition tokens (suffix: 729 image + 256 ByT5 + 1000 Qwen, "
        f"{HUNYUAN_PROMPT_TOKENS} valid, rest masked as padding); all 54 blocks are identical dual-stream blocks",
        subset={"num_layers": 12},
        quick_subset={"num_layers": 4},
        source="diffusers scripts/convert_hunyuan_video1_5_to_diffusers.py TRANSFORMER_CONFIGS['480p_t2v'] "
        "(= HunyuanVideo15Transformer3DModel defaults but task_type); "
        "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
    ),
    "ltx2": ModelSpec(
        "LTX2VideoTransformer3DModel",
        LTX2,
        {"512x768": (121, 512, 768)},
        _ltx2_inputs,
        layers_attr="transformer_blocks",
        note="LTX-2 19B audio+video at the pipeline's default 512x768, 121 frames -> 16 x 16 x 24 = 6,144 video "
        "tokens (the sparse self-attention) + 126 audio tokens (native); at this length attention is a small share",
        subset={"num_layers": 16},
        quick_subset={"num_layers": 4},
        source="diffusers scripts/convert_ltx2_to_diffusers.py get_ltx2_transformer_config('2.0'); other values: "
        "LTX2VideoTransformer3DModel defaults; Lightricks/LTX-2",
    ),
}

QUICK_MODELS = ["wan2.1-1.3b", "hunyuanvideo"]  # --quick default: Wan2.1-1.3B 480p + 720p and HunyuanVideo 720p
QUICK_REPEATS = 3


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, quick: bool = False) -> Any:
    """The transformer of ``spec`` with random weights, made on ``device`` and cast like ``from_pretrained``."""
    import diffusers

    cls = getattr(diffusers, spec.cls_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**spec.build_config(quick))
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    persistent = set(model.state_dict())
    tensors = itertools.chain(model.named_parameters(), ((n, b) for n, b in model.named_buffers() if n in persistent))
    for name, tensor in tensors:
        if tensor.is_floating_point():
            target = torch.float32 if any(m in name.split(".") for m in keep) else dtype
            tensor.data = tensor.data.to(device=device, dtype=target)
    return model.to(device).eval()
