"""TokenLayout and BlockPlan: geometry, conversions, density and checks."""

import pytest
import torch

from dit_sparse import HEAD_DENSE, HEAD_SKIP, BlockPlan, TokenLayout
from dit_sparse.plan import add_text, token_to_block_mask


def test_layout_sizes_and_text_range():
    lay = TokenLayout(3, 4, 5, text_len=7, text_where="prefix")
    assert lay.video_len == 60 and lay.seq_len == 67 and lay.video_start == 7
    assert lay.text_range == (0, 7)
    suf = TokenLayout(3, 4, 5, text_len=7, text_where="suffix")
    assert suf.video_start == 0 and suf.text_range == (60, 67)
    assert suf.is_text().sum() == 7 and suf.is_text()[60:].all()
    coords = lay.video_coords()
    assert coords[0].tolist() == [0, 0, 0] and coords[-1].tolist() == [2, 3, 4]
    assert coords[21].tolist() == [1, 0, 1]  # n = t*H*W + h*W + w


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(frames=0, height=2, width=2), "frames, height, width"),
        (dict(frames=1, height=2, width=2, text_len=3), "text_where"),
        (dict(frames=1, height=2, width=2, text_where="middle", text_len=2), "prefix"),
    ],
)
def test_layout_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenLayout(**kwargs)


def test_tile_permutation_groups_tiles_and_keeps_text():
    lay = TokenLayout(2, 4, 6, text_len=3, text_where="suffix")
    perm = lay.tile_permutation((1, 2, 3))
    assert sorted(perm.tolist()) == list(range(lay.seq_len))
    assert perm[-3:].tolist() == [48, 49, 50]  # text stays at the end
    coords = lay.video_coords()[perm[:48]]
    for tile in range(8):  # every run of 6 tokens is one 1x2x3 tile
        c = coords[tile * 6 : tile * 6 + 6]
        assert (c.max(0).values - c.min(0).values).tolist() == [0, 1, 2]
    # uneven grid: edge tiles smaller, still a permutation
    odd = TokenLayout(3, 5, 7)
    assert sorted(odd.tile_permutation((2, 2, 4)).tolist()) == list(range(odd.seq_len))


def test_block_extent_boxes():
    lay = TokenLayout(2, 2, 4, text_len=4, text_where="prefix")
    lo, hi, has_video = lay.block_extent(4)
    assert has_video.tolist() == [False, True, True, True, True]
    assert lo[1].tolist() == [0, 0, 0] and hi[1].tolist() == [0, 0, 3]
    assert lo[4].tolist() == [1, 1, 0] and hi[4].tolist() == [1, 1, 3]


def random_plan(b, h, n, block, seed=0, perm=False, head_mode=None):
    g = torch.Generator().manual_seed(seed)
    m = -(-n // block)
    mask = torch.rand(b, h, m, m, generator=g) < 0.4
    mask |= torch.eye(m, dtype=torch.bool)
    p = torch.randperm(n, generator=g) if perm else None
    return BlockPlan.from_block_mask(mask, n, block, perm=p, head_mode=head_mode), mask


def test_from_block_mask_round_trip_and_density():
    plan, mask = random_plan(2, 3, 70, 16)
    assert plan.kv_num_blocks.shape == (2, 3, 5) and plan.kv_indices.shape == (2, 3, 5, 5)
    assert torch.equal(plan.block_mask(), mask)
    dense = plan.to_dense_mask()
    assert dense.shape == (2, 3, 70, 70)
    assert plan.density() == pytest.approx(dense.float().mean().item(), abs=1e-6)
    full = BlockPlan.full(70, 16)
    assert full.density() == pytest.approx(1.0) and full.to_dense_mask().all()


def test_to_dense_mask_undoes_permutation():
    n, block = 40, 8
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    m = n // block
    plan = BlockPlan.from_block_mask(torch.eye(m, dtype=torch.bool), n, block, perm=perm)
    dense = plan.to_dense_mask()[0, 0]
    pos = torch.argsort(perm)  # position of each original token after the permutation
    for i, j in [(0, 1), (5, 17), (39, 2)]:
        assert dense[i, j] == (pos[i] // block == pos[j] // block)


def test_skip_heads_have_no_entries():
    plan, _ = random_plan(1, 3, 32, 8, head_mode=(0, HEAD_SKIP, 0))
    assert not plan.to_dense_mask()[0, 1].any()
    assert plan.to_dense_mask()[0, 0].any()
    plan.check()  # a skipped head may list anything


def test_check_rejects_bad_plans():
    n, block = 32, 8
    empty = torch.eye(4, dtype=torch.bool)
    empty[2, 2] = False
    with pytest.raises(ValueError, match="query block 2 .* attends no key block"):
        BlockPlan.from_block_mask(empty, n, block).check()
    plan = BlockPlan.full(n, block)
    bad = BlockPlan(n, block, block, plan.kv_num_blocks, plan.kv_indices.clone().fill_(7))
    with pytest.raises(ValueError, match=r"kv_indices must lie in \[0, 4\)"):
        bad.check()
    rep = plan.kv_indices.clone()
    rep[..., 1] = 0
    with pytest.raises(ValueError, match="repeats"):
        BlockPlan(n, block, block, plan.kv_num_blocks, rep).check()
    with pytest.raises(ValueError, match="HEAD_DENSE"):
        BlockPlan.from_block_mask(torch.eye(4, dtype=torch.bool), n, block, head_mode=(HEAD_DENSE,)).check()
    with pytest.raises(ValueError, match="kv_num_blocks must be"):
        BlockPlan(n, block, block, plan.kv_num_blocks[..., :2], plan.kv_indices)
    with pytest.raises(ValueError, match="int32"):
        BlockPlan(n, block, block, plan.kv_num_blocks.long(), plan.kv_indices)
    with pytest.raises(ValueError, match="not a permutation"):
        BlockPlan.full(n, block).__class__.from_block_mask(
            torch.ones(4, 4, dtype=torch.bool), n, block, perm=torch.zeros(n, dtype=torch.long)
        ).check()


def test_add_text_marks_text_rows_and_columns():
    lay = TokenLayout(1, 4, 4, text_len=5, text_where="prefix")  # 21 tokens, blocks of 8: text in block 0
    mask = torch.zeros(3, 3, dtype=torch.bool)
    out = add_text(mask, lay, 8, 8)
    assert out[0].all() and out[:, 0].all() and not out[1:, 1:].any()
    suf = TokenLayout(1, 4, 4, text_len=5, text_where="suffix")  # text = tokens 16..20: block 2
    out = add_text(mask, suf, 8, 8)
    assert out[2].all() and out[:, 2].all() and not out[:2, :2].any()


def test_token_to_block_mask_covers():
    tok = torch.zeros(10, 10, dtype=torch.bool)
    tok[0, 9] = True
    blocks = token_to_block_mask(tok, 4, 4)
    assert blocks.shape == (3, 3) and blocks[0, 2] and blocks.sum() == 1


def test_plan_cache_builds_once_per_plan_and_is_not_part_of_identity():
    """Derived data (a backend's preprocessed lists, the density) lives in the plan's own cache."""
    import dataclasses

    plan, twin = BlockPlan.full(40, 16), BlockPlan.full(40, 16)
    built = []

    def build():
        built.append(1)
        return torch.zeros(3)

    h = hash(plan)
    first = plan.derived("x", build)
    assert plan.derived("x", build) is first and len(built) == 1  # built once
    assert twin.derived("x", build) is not first and len(built) == 2  # never shared with another plan
    assert plan.derived(("x", 2), build) is not first and len(built) == 3  # keys are separate
    assert hash(plan) == h and plan != twin and "_derived" not in repr(plan) and "zeros" not in repr(plan)
    # a moved or replaced plan starts with an empty cache (its tensors differ)
    assert plan.to("cpu").derived("x", build) is not first
    assert dataclasses.replace(plan, density_hint=0.5).derived("x", build) is not first
    assert len(built) == 5
    # the density is measured once per plan
    assert plan.density_tensor() is plan.density_tensor() and plan.density() == 1.0
