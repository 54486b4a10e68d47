"""Tiny random Wan text-to-video pipelines for tests and offline demos (no download; meaningless output).

:func:`tiny_random_wan_pipeline` builds one in memory, with a small word-level tokenizer and UMT5 text encoder made
here, so that it takes plain text prompts; :func:`save_tiny_random_wan_pipeline` writes it as a Diffusers folder that
``WanPipeline.from_pretrained`` / ``DiffusionPipeline.from_pretrained`` load (what the CLI's ``--model`` takes).
Sizes follow Diffusers' own Wan pipeline tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["tiny_random_wan_pipeline", "save_tiny_random_wan_pipeline", "TINY_WORDS"]

TINY_WORDS = (
    "a an the red green blue yellow white black circle square triangle ball box moving right left up down "
    "slowly quickly small big on background and purple cyan orange gray brown striped checkered"
).split()


TINY_WAN_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
"""The tiny random WanTransformer3DModel config of the CPU tests and smoke runs (2 heads of 12, 2 blocks)."""


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *TINY_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_random_wan_pipeline(seed: int = 0, *, layers: int = 2) -> Any:
    """A ``WanPipeline`` with random tiny weights (transformer dim 24, 2 heads), float32, on the CPU."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel  # noqa: PLC0415
    from transformers import UMT5Config, UMT5EncoderModel  # noqa: PLC0415

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    transformer = WanTransformer3DModel(**{**TINY_WAN_CONFIG, "num_layers": layers})
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


def save_tiny_random_wan_pipeline(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Save :func:`tiny_random_wan_pipeline` as a Diffusers folder at ``path``; returns the path."""
    path = Path(path)
    tiny_random_wan_pipeline(seed, **kwargs).save_pretrained(path)
    return path
