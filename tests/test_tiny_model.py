"""The embedded tiny text-to-video model and its procedural data (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_sparse import defaults
from dit_sparse.train.captions import check_video, parse_caption
from dit_sparse.train.data import COLOURS, DIRECTIONS, batch, render, render_with_coverage, sample_scenes

MODEL = defaults.MODEL_PATH


def test_data_is_seeded() -> None:
    a, caps_a = batch(7, 3, 9, 32, 32)
    b, caps_b = batch(7, 3, 9, 32, 32)
    c, caps_c = batch(8, 3, 9, 32, 32)
    assert torch.equal(a, b) and caps_a == caps_b
    assert caps_a != caps_c or not torch.equal(a, c)
    assert a.shape == (3, 3, 9, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_data_matches_captions() -> None:
    videos, captions = batch(123, 12, 61, 64, 64, two_prob=0.5)
    for video, caption in zip(videos, captions, strict=True):
        assert check_video(video, caption).ok, caption
        # the same video with every direction swapped for its opposite must fail the check
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
        swapped = " ".join(opposite.get(w, w) for w in caption.split())
        assert not check_video(video, swapped).ok, swapped


def test_latent_object_mask_follows_the_object() -> None:
    from dit_sparse.train.transformer import latent_object_mask

    scenes = sample_scenes(3, 2, two_prob=0.0)
    video, coverage = render_with_coverage(scenes, 61, 128, 128)
    assert torch.equal(video, render(scenes, 61, 128, 128))
    assert coverage.shape == (2, 1, 61, 128, 128) and 0 < coverage.mean() < 0.1
    mask = latent_object_mask(coverage)
    assert mask.shape == (2, 1, 16, 16, 16) and mask.dtype == torch.bool
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    for b in range(2):
        for k in range(16):
            frame = coverage[b, 0, 4 * k]  # the last pixel frame of latent frame k
            cy, cx = (frame * ys).sum() / frame.sum(), (frame * xs).sum() / frame.sum()
            assert mask[b, 0, k, int(cy) // 8, int(cx) // 8], (b, k)
    assert mask.float().mean() < 0.25  # the mask stays near the object


def test_captions_use_the_grammar() -> None:
    for scene in sample_scenes(5, 20, two_prob=0.5):
        pairs = parse_caption(scene.caption)
        assert len(pairs) == len(scene.objects)
        assert all(c in COLOURS and d in DIRECTIONS for c, d in pairs)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import WanPipeline

    p = WanPipeline.from_pretrained(str(MODEL), torch_dtype=torch.float32, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_model_folder(pipe) -> None:
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 40 * 2**20
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert pipe.transformer.config.attention_head_dim == 64
    ids = pipe.tokenizer(defaults.PROMPT).input_ids
    assert pipe.tokenizer.unk_token_id not in ids
    # default size -> at least 4096 video tokens
    p = pipe.transformer.config.patch_size
    lat_t = (defaults.FRAMES - 1) // pipe.vae_scale_factor_temporal + 1
    lat_h, lat_w = defaults.HEIGHT // pipe.vae_scale_factor_spatial, defaults.WIDTH // pipe.vae_scale_factor_spatial
    assert (lat_t // p[0]) * (lat_h // p[1]) * (lat_w // p[2]) >= 4096


def test_wheels_carry_the_whole_model_folder() -> None:
    """pyproject installs assets/ as dit_sparse/assets: its package-data globs must match every file of every
    embedded model folder (the video model and the 3D one)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parent.parent
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assets = root / cfg["package-dir"]["dit_sparse.assets"]
    assert MODEL.parent.resolve() == assets.resolve()
    packaged = {p for pattern in cfg["package-data"]["dit_sparse.assets"] for p in assets.glob(pattern) if p.is_file()}
    assert packaged == {p for p in assets.rglob("*") if p.is_file() and p.parent != assets}
    assert {p.parent.name for p in packaged if p.parent.parent == assets} >= {MODEL.name, "tiny-3d"}


def test_generate_short_video(pipe) -> None:
    out = pipe(
        defaults.PROMPT,
        num_frames=9,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    assert out.shape == (1, 9, 64, 64, 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_caption_check_on_generated_videos(pipe) -> None:
    """The model card's caption check at the package defaults, on the first four evaluation prompts."""
    from dit_sparse.train.evaluate import eval_prompts, generate

    prompts = eval_prompts(4)
    videos = generate(
        pipe,
        prompts,
        steps=defaults.STEPS,
        guidance=defaults.GUIDANCE,
        frames=defaults.FRAMES,
        height=defaults.HEIGHT,
        width=defaults.WIDTH,
        batch=4,
    )
    checks = [check_video(v, p) for v, p in zip(videos, prompts, strict=True)]
    assert all(len(c.objects) == 1 for c in checks)  # the check itself ran on every video
    assert sum(c.ok for c in checks) >= 3, [(c.caption, c.objects) for c in checks]
