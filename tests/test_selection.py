"""The block scoring and selection shared by the dynamic methods (dit_sparse/methods/selection.py)."""

from __future__ import annotations

import pytest
import torch
from host_sync import HostSyncError, no_host_sync

from dit_sparse.layout import TokenLayout
from dit_sparse.methods.selection import (
    forced_blocks,
    keep_count,
    keep_first,
    pool_blocks,
    rank_rows,
    select_global,
    text_blocks,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_keep_count_bounds():
    assert keep_count(0.25, 100) == 25
    assert keep_count(0.0, 10) == 1  # never an empty selection
    assert keep_count(1.0, 10) == 10


def test_pool_blocks_means_whole_blocks_only():
    x = _randn(2, 3, 21, 4)
    pooled = pool_blocks(x, 4)
    assert pooled.shape == (2, 3, 5, 4) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[:, :, 2], x[:, :, 8:12].mean(2))
    index = torch.tensor([20, 3, 7, 1, 0, 2, 5, 6, 9])  # 2 whole blocks, 1 token left over
    pooled = pool_blocks(x.to(torch.bfloat16), 4, index)
    assert pooled.shape == (2, 3, 2, 4)
    torch.testing.assert_close(pooled[:, :, 0], x[:, :, [20, 3, 7, 1]].bfloat16().float().mean(2))


@pytest.mark.parametrize("where", ["prefix", "suffix"])
def test_text_blocks_and_forced(where):
    layout = TokenLayout(2, 3, 4, text_len=5, text_where=where)  # 24 video + 5 text = 29 tokens, blocks of 8
    text = text_blocks(layout, 8)
    expected = {"prefix": [True, False, False, False], "suffix": [False, False, False, True]}[where]
    assert text.tolist() == expected
    perm = torch.cat([torch.arange(5, 29), torch.arange(5)]) if where == "prefix" else None
    if perm is not None:  # text moved to the end by a permutation
        assert text_blocks(layout, 8, perm).tolist() == [False, False, False, True]
    forced = forced_blocks(text)
    t = text.nonzero()[0, 0]
    assert bool(forced[t].all() and forced[:, t].all() and forced.diagonal().all())
    assert int(forced.sum()) == 4 + 4 + 4 - 1 - 1  # text row + column + diagonal, overlaps counted once
    assert not bool(forced_blocks(text, diagonal=False).diagonal()[~text].any())


def test_select_global_keeps_exactly_the_largest():
    scores = _randn(2, 3, 6, 7).softmax(-1)
    mask = select_global(scores, 10)
    assert mask.sum((-1, -2)).eq(10).all()
    kept_min = scores.masked_fill(~mask, float("inf")).amin((-1, -2))
    dropped_max = scores.masked_fill(mask, -float("inf")).amax((-1, -2))
    assert bool((kept_min > dropped_max).all())  # one threshold per (batch, head) map
    with pytest.raises(ValueError, match="keep"):
        select_global(scores, 0)


def test_rank_rows_forced_first_and_keep_first_counts():
    scores = _randn(1, 2, 5, 8).softmax(-1)
    forced = torch.zeros(5, 8, dtype=torch.bool)
    forced[:, 7] = True  # a text column
    forced[2] = True  # a text row
    order, cum = rank_rows(scores, forced)
    rows = [0, 1, 3, 4]  # row 2 is all forced
    assert bool((order[..., rows, 0] == 7).all())  # the forced column comes first
    torch.testing.assert_close(cum[..., -1], scores.sum(-1))
    k = torch.tensor([[2, 4]])
    mask = keep_first(order, k) | forced
    counts = mask.sum(-1)
    assert counts[0, 0].tolist() == [2, 2, 8, 2, 2] and counts[0, 1].tolist() == [4, 4, 8, 4, 4]
    assert bool(mask[..., 7].all())
    # the unforced picks are the highest-scoring columns
    top = scores[0, 0, 0, :7].argmax()
    assert bool(mask[0, 0, 0, top])


def test_density_hint_spares_the_kernel_a_host_read():
    """The Triton backend's autotune band reads a plan's density once per plan: a dynamic plan (new every call)
    carries a host-side hint instead."""
    pytest.importorskip("triton")
    from dit_sparse.kernels.triton_attention import _density_octave, _prepare
    from dit_sparse.plan import BlockPlan

    mask = (_randn(1, 2, 5, 5) > 0) | torch.eye(5, dtype=torch.bool)
    hinted = BlockPlan.from_block_mask(mask, 37, 8, density_hint=0.3)
    with no_host_sync():
        assert _density_octave(hinted, 2, _prepare(hinted, 2)) == 2  # octave of 0.3
    plain = BlockPlan.from_block_mask(mask, 37, 8)
    with pytest.raises(HostSyncError), no_host_sync():
        _density_octave(plain, 2, _prepare(plain, 2))
    assert BlockPlan.full(37, 8).density_hint == 1.0
    with pytest.raises(ValueError, match="density_hint"):
        BlockPlan.from_block_mask(mask, 37, 8, density_hint=1.5)
