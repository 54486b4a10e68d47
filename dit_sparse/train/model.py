"""Builders for the tiny Wan-architecture text-to-video model, prompt encoding and checkpoint files.

Every part is a stock Diffusers / Transformers class (WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel, a word-level PreTrainedTokenizerFast), so the exported folder loads with
``WanPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import vocabulary

#: Architecture of the tiny model (kept here so training, export and tests agree).
#: Wan 2.2-style VAE: 2x2 patchify + residual blocks, two down-samplings -> 8x spatial, 4x temporal overall.
#: (Every full-resolution stage runs at 64 px with >= 32 channels, which keeps CPU decoding fast.)
VAE_CONFIG: dict = dict(
    base_dim=32,
    z_dim=16,
    dim_mult=[1, 2, 2],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[True, True],
    dropout=0.0,
    is_residual=True,
    patch_size=2,
    in_channels=12,
    out_channels=12,
    scale_factor_spatial=8,
    scale_factor_temporal=4,
)
TEXT_DIM = 128
TRANSFORMER_CONFIG: dict = dict(
    patch_size=(1, 1, 1),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=256,
    ffn_dim=768,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
MAX_SEQUENCE_LENGTH = 512  # what WanPipeline pads prompt embeddings to by default
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def build_tokenizer():
    """A word-level fast tokenizer over the caption vocabulary (pad=0, eos=1, unk=2), built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
        padding_side="right",
    )


def build_text_encoder(vocab_size: int):
    """A tiny UMT5 encoder (2 layers, d_model 128)."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=((vocab_size + 15) // 16) * 16,
        d_model=TEXT_DIM,
        d_kv=64,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=0,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return UMT5EncoderModel(cfg)


def build_vae():
    """A tiny AutoencoderKLWan (8x spatial, 4x temporal compression, 16 latent channels)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**VAE_CONFIG)


def build_transformer():
    """A tiny WanTransformer3DModel (4 layers, 4 heads of 64, patch 1x1x1)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device | str,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> torch.Tensor:
    """Prompt embeddings exactly as WanPipeline makes them: encoder states trimmed to the tokens, zero-padded."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask = ids.attention_mask.to(device)
    hidden = text_encoder(ids.input_ids.to(device), mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean and std from the VAE config, shaped (1, C, 1, 1, 1)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


# ----------------------------------------------------------------------------------------------- checkpoints
MAX_SHARD_BYTES = 15 * 1024 * 1024  # the device machine returns files of at most 16 MiB


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Save tensors as safetensors shards of at most 15 MiB plus ``meta.json`` (atomic per file)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if size and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v.detach().cpu().clone()  # clone: tied weights share storage
        size += nbytes
    for i, s in enumerate(shards):
        save_file(s, str(out / f"shard-{i:02d}.safetensors"))
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / "meta.json")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load what ``save_checkpoint`` wrote."""
    p = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(p.glob("shard-*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors, json.loads((p / "meta.json").read_text())


def prefixed(state: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype | None = None) -> dict:
    """``state`` with keys prefixed (and floating tensors cast to ``dtype`` if given)."""
    return {prefix + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix``, prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
