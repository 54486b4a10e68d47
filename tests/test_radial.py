"""Radial Attention: density vs an independent statement of the official mask, O(n log n) growth, geometry, kernels."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dit_sparse.kernels import block_sparse_attention
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import get_method
from dit_sparse.methods.radial import RadialConfig, radial_block_mask
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext


# ------------------------------------------------------------------ independent statement of the official mask
# mit-han-lab/radial-attention @72788d4, radial_attn/attn_mask.py, gen_log_mask_shrinked(model_type="wan"):
# materialise each frame pair's token mask, pad it to the absolute block grid, shrink it with the column-density
# rule, OR it into the block mask. Identical frame pairs (same window, same block offsets) are computed once.
def _official_window(dist: int, p: int, decay: float, bs: int) -> float:
    if dist <= 1:
        return p
    length = 2 ** p.bit_length() / 2 ** dist.bit_length() * decay
    return length if length >= bs else bs


def _official_split_keep(dist: int, p: int) -> bool:
    if dist <= 1:
        return True
    length = 2 ** p.bit_length() / 2 ** dist.bit_length()
    return length >= 128 or dist % int(128 / length) == 0


@functools.lru_cache(maxsize=8)
def _official_row_cumsum(p: int, window: float) -> torch.Tensor:
    """Running row counts ``[p + 1, p]`` of the frame pair's token mask ``|c - r| <= window``."""
    r = torch.arange(p, dtype=torch.int16)
    local = (r[None, :] - r[:, None]).abs() <= window
    return torch.cat([torch.zeros(1, p, dtype=torch.int32), local.cumsum(0, dtype=torch.int32)])


@functools.cache
def _official_pair(p: int, window: float, rr: int, rc: int, bs: int) -> torch.Tensor:
    """Block mask of one frame pair placed at row/column offsets ``rr, rc`` inside its first block, shrunk with the
    official column-density rule (identical to materialising the padded token mask and summing each block's rows)."""
    size = ((p - 1) // bs + 1) * bs
    nb = size // bs  # the official shrink keeps floor(padded / bs) blocks
    run = _official_row_cumsum(p, min(window, float(p)))
    edges = (torch.arange(nb + 1) * bs - rr).clamp(0, p)  # block-row borders in frame rows
    counts = run[edges[1:]] - run[edges[:-1]]  # [nb, p]: rows of each block row reaching each column
    cols = torch.zeros(nb, rc + size, dtype=torch.int32)
    cols[:, rc : rc + p] = counts
    cols = cols[:, : nb * bs].reshape(nb, nb, bs)
    frac = (cols * 3 > bs).sum(-1) / ((cols > 0).sum(-1) + 1e-9)  # column density > 1/3 of the block's rows
    return frac > 0.6


def official_block_density(frames: int, p: int, decay: float = 0.2, bs: int = 128) -> float:
    m = -(-frames * p // bs)
    mask = torch.zeros(m, m, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            dist = abs(i - j)
            if not (j == 0 or _official_split_keep(dist, p)):
                continue
            window = float(p) if j == 0 else float(_official_window(dist, p, decay, bs))  # j == 0: Wan's sink
            bm = _official_pair(p, window, (i * p) % bs, (j * p) % bs, bs)
            r0, c0 = i * p // bs, j * p // bs
            r1, c1 = min(m, r0 + bm.shape[0]), min(m, c0 + bm.shape[1])
            mask[r0:r1, c0:c1] |= bm[: r1 - r0, : c1 - c0]
    return float(mask.float().mean())


def token_formula_density(frames: int, p: int, decay: float = 0.2, min_window: int = 128) -> float:
    """The paper's rule at token level (no blocks): closed-form band areas per frame pair."""
    total = 0
    for i in range(frames):
        for j in range(frames):
            dist = abs(i - j)
            if j == 0 or dist <= 1:
                total += p * p
                continue
            if not _official_split_keep(dist, p):
                continue
            w = math.floor(max(2 ** p.bit_length() / 2 ** dist.bit_length() * decay, min_window))
            total += p * p if w >= p - 1 else p * (2 * w + 1) - w * (w + 1)
    return total / (frames * p) ** 2


def _plan(layout: TokenLayout, **params) -> BlockPlan:
    method = get_method("radial", **params)
    q = torch.zeros(layout.batch, 1, layout.seq_len, 1)
    ctx = StepContext(20, None, "cond", "blocks.3.attn1", 3, layout)
    return method.get_plan(q, q, layout, ctx)


# ------------------------------------------------------------------ density
@pytest.mark.parametrize(("grid", "expected"), [((21, 30, 52), 0.3379), ((21, 45, 80), 0.2619)])
def test_density_matches_official_mask(grid, expected):
    t, h, w = grid
    official = official_block_density(t, h * w)
    assert official == pytest.approx(expected, abs=5e-4)  # measured once with a literal copy of the official code
    ours = _plan(TokenLayout(t, h, w)).density()
    assert abs(ours - official) / official < 0.10, (ours, official)
    assert abs(ours - official) / official < 0.02  # in fact within 2% (the deviation is the dense-pair rule)


def test_block_mask_contains_official_blocks():
    """Every block the official 720p mask computes is computed here too (the official mask is a subset)."""
    t, h, w = 21, 45, 80
    p, bs = h * w, 128
    ours = radial_block_mask(TokenLayout(t, h, w), bs)
    for i, j in [(0, 5), (3, 4), (10, 12), (20, 9), (17, 1)]:
        dist = abs(i - j)
        if not (j == 0 or _official_split_keep(dist, p)):
            continue
        window = float(p) if j == 0 else float(_official_window(dist, p, 0.2, bs))
        bm = _official_pair(p, window, (i * p) % bs, (j * p) % bs, bs)
        r0, c0 = i * p // bs, j * p // bs
        sub = ours[r0 : r0 + bm.shape[0], c0 : c0 + bm.shape[1]]
        assert bool((sub | ~bm[: sub.shape[0], : sub.shape[1]]).all())


def test_density_grows_as_n_log_n():
    h, w = 30, 52
    frames = [21, 41, 81, 161]
    dens = [_plan(TokenLayout(t, h, w)).density() for t in frames]
    assert all(a > b for a, b in zip(dens, dens[1:], strict=False))  # dense fraction falls
    per_row = [d * t for d, t in zip(dens, frames, strict=True)]  # frames-equivalent attended per query
    assert all(a < b for a, b in zip(per_row, per_row[1:], strict=False))  # more than O(n) ...
    ratio = [r / math.log2(t) for r, t in zip(per_row, frames, strict=True)]
    assert max(ratio) / min(ratio) < 1.4, ratio  # ... and O(n log n): density·n / log n stays flat
    # O(n^2) would double per_row each time n doubles; here it grows by a constant step per doubling
    steps = [b - a for a, b in zip(per_row, per_row[1:], strict=False)]
    assert max(steps) / min(steps) < 2.0, steps
    # the token-level formula shows the same growth
    tok = [token_formula_density(t, h * w) * t / math.log2(t) for t in frames]
    assert max(tok) / min(tok) < 1.4


def test_plan_at_real_size_is_cheap():
    """720p, 161 latent frames (579,600 tokens): a block-level plan, no N×N tensor (would be 336 GB)."""
    layout = TokenLayout(161, 45, 80)
    mask = radial_block_mask(layout, 128)
    assert mask.shape == (4529, 4529)
    assert 0.05 < float(mask.float().mean()) < 0.1


# ------------------------------------------------------------------ geometry on small grids
def _dense_token_rule(layout: TokenLayout, min_window: int, decay: float, sink: bool) -> torch.Tensor:
    """Token pairs the rule must always compute: dense frame pairs, the sink, and text."""
    coords = torch.full((layout.seq_len,), -1)
    coords[layout.video_start : layout.video_start + layout.video_len] = layout.video_coords()[:, 0]
    t = coords
    video = t >= 0
    must = video[:, None] & video[None, :] & ((t[:, None] - t[None, :]).abs() <= 1)
    if sink:
        must |= video[:, None] & (t[None, :] == 0)
    text = ~video
    return must | text[:, None] | text[None, :]


@pytest.mark.parametrize("text_where", ["none", "prefix", "suffix"])
def test_small_grid_geometry(text_where):
    text_len = 0 if text_where == "none" else 7
    layout = TokenLayout(9, 4, 6, text_len=text_len, text_where=text_where)  # N = 216 (+7): not a block multiple
    plan = _plan(layout, block_size=16, min_window=16, decay=0.5)
    mask = plan.to_dense_mask()[0, 0]
    must = _dense_token_rule(layout, 16, 0.5, True)
    assert bool((mask | ~must).all())
    assert plan.density() < 0.9
    # no sink: frame 0 is no longer attended by far frames
    far = _plan(layout, block_size=16, min_window=16, decay=0.5, sink=False).to_dense_mask()[0, 0]
    v0 = layout.video_start
    last = slice(v0 + 7 * 24, v0 + 8 * 24)  # frame 7: distance 7 is dropped (split 4)
    assert not bool(far[last, v0 : v0 + 24].all())
    assert bool(mask[last, v0 : v0 + 24].all())


def test_config_defaults_are_official():
    cfg = RadialConfig()
    assert (cfg.decay, cfg.dense_layers, cfg.warmup_steps(50), cfg.block_size, cfg.sink) == (0.2, 1, 12, 128, True)
    with pytest.raises(ValueError, match="decay"):
        RadialConfig(decay=0)


@pytest.mark.parametrize("text_where", ["prefix", "suffix"])
def test_radial_equals_reference_kernel(text_where):
    layout = TokenLayout(5, 3, 5, text_len=6, text_where=text_where)  # N = 81, odd
    plan = _plan(layout, block_size=8, min_window=4, decay=0.5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 8, generator=g) for _ in range(3))
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    flex = block_sparse_attention(q, k, v, plan, backend="flex")
    mask = plan.to_dense_mask()
    scores = (q @ k.transpose(-1, -2)) * 8**-0.5
    manual = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(ref, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex, manual, atol=1e-5, rtol=1e-5)
    assert plan.density() < 1.0 or text_where == "suffix"  # 81 tokens in 11 blocks: little room for sparsity
