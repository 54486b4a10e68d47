"""DraftAttention: draft map vs the official patch pooling, block selection geometry, kernels, end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from host_sync import no_host_sync
from tiny_dit import BUILDERS, applied, generate_latents, run, wan_pipeline

import dit_sparse
from dit_sparse.kernels import block_sparse_attention
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import get_method
from dit_sparse.methods.draft import DraftConfig
from dit_sparse.methods.selection import keep_count
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext

SMALL = dict(pool=(2, 4), block_size=8, sparsity=0.6)


def _qkv(layout: TokenLayout, heads: int = 2, d: int = 8, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.batch, heads, layout.seq_len, d, generator=g).to(dtype) for _ in range(3)]


def _ctx(layout: TokenLayout, step: int = 20) -> StepContext:
    return StepContext(step, None, "cond", "blocks.3.attn1", 3, layout)


def _manual(q, k, v, plan: BlockPlan) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~plan.to_dense_mask(), float("-inf")), -1) @ v.float()


def test_config_defaults_are_official_and_bad_values_fail():
    cfg = DraftConfig()
    assert (cfg.sparsity, cfg.pool, cfg.block_size, cfg.warmup_steps(50), cfg.dense_layers) == (
        0.75,
        (8, 16),
        128,
        15,
        1,
    )
    with pytest.raises(ValueError, match="pool"):
        DraftConfig(pool=(8, 8))  # 64 tokens, block 128
    with pytest.raises(ValueError, match="pool"):
        DraftConfig(pool=(0, 16))
    with pytest.raises(ValueError, match="sparsity"):
        DraftConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity"):
        DraftConfig(sparsity=-0.1)
    with pytest.raises(TypeError, match="sparsity_ratio"):
        get_method("draft", sparsity_ratio=0.9)


def test_draft_map_is_the_official_patch_pooling():
    """Grid a multiple of the patch: the draft tokens are the per-frame avg_pool2d of the official code."""
    layout = TokenLayout(3, 4, 8, text_len=5, text_where="suffix", batch=2)
    q, k, _ = _qkv(layout, heads=3, d=6)
    method = get_method("draft", **SMALL)
    draft = method.draft_map(q, k, method.geometry(layout, q.device))

    def pooled(x):  # [B, H, N, D] -> [B, H, T * 2 * 2, D]: per frame, 2x4 patches, frame-major patch order
        b, h, _, d = x.shape
        frames = x[:, :, : layout.video_len].reshape(b * h, 3, 4, 8, d).permute(0, 1, 4, 2, 3).reshape(-1, d, 4, 8)
        p = F.avg_pool2d(frames, (2, 4), ceil_mode=True)  # [B*H*T, D, 2, 2]
        return p.reshape(b, h, 3, d, 4).permute(0, 1, 2, 4, 3).reshape(b, h, 12, d)

    ref = torch.softmax(pooled(q) @ pooled(k).transpose(-1, -2) / 6**0.5, -1)
    torch.testing.assert_close(draft, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_where", ["none", "prefix", "suffix"])
@pytest.mark.parametrize("grid", [(3, 4, 8), (3, 5, 7)])  # a multiple of the 2x4 patch, and not (odd N)
def test_selection_geometry(text_where, grid):
    text = 0 if text_where == "none" else 6
    layout = TokenLayout(*grid, text_len=text, text_where=text_where, batch=2)
    q, k, _ = _qkv(layout)
    method = get_method("draft", **SMALL)
    plan = method.get_plan(q, k, layout, _ctx(layout)).check()
    mv = layout.video_len // 8
    blocks = plan.block_mask()
    assert bool(blocks.diagonal(dim1=-2, dim2=-1).all())  # every query block keeps its own block
    kept = blocks[..., :mv, :mv].sum((-1, -2))
    keep = keep_count(0.4, mv * mv)
    assert bool(((kept >= keep) & (kept <= keep + mv)).all())  # the draft's share, plus at most the diagonal
    assert bool(blocks[..., mv:, :].all() and blocks[..., :, mv:].all())  # text / partial blocks dense
    token = plan.to_dense_mask()
    is_text = layout.is_text()
    assert bool(token[:, :, is_text].all() and token[:, :, :, is_text].all())
    listed = float(plan.kv_num_blocks.float().mean()) / plan.num_kv_blocks
    hint = method.density_hint(layout)  # the share of key blocks listed, forced diagonal blocks aside
    assert hint - 1e-6 <= listed <= hint + 1 / mv
    assert plan.density() < 0.9
    assert plan.density_hint == method.density_hint(layout)
    # the permutation lists every video tokens patch by patch, then the text
    assert bool(layout.is_text()[plan.perm][layout.video_len :].all())


@pytest.mark.parametrize(
    ("text_where", "dtype"), [("prefix", torch.float32), ("suffix", torch.float32), ("suffix", torch.bfloat16)]
)
def test_output_equals_reference_kernel_on_its_plan(text_where, dtype):
    layout = TokenLayout(3, 5, 7, text_len=6, text_where=text_where, batch=2)  # N = 111
    q, k, v = _qkv(layout, dtype=dtype)
    method = get_method("draft", **SMALL)
    plans = []

    def kernel(q_, k_, v_, plan, return_lse=False, aux_work=False):
        plans.append(plan)
        return block_sparse_attention(q_, k_, v_, plan, backend="reference"), None

    out = method.attend(q, k, v, layout, _ctx(layout), kernel)
    assert out.dtype == dtype and out.shape == q.shape
    manual = _manual(q, k, v, plans[0])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), manual, atol=tol, rtol=tol)
    if dtype == torch.float32:
        flex = block_sparse_attention(q, k, v, plans[0], backend="flex")
        torch.testing.assert_close(flex, manual, atol=1e-5, rtol=1e-5)


def test_triton_kernel_runs_the_dynamic_plan():
    """The Triton kernel (CPU interpreter in tests) on a draft plan: permutation, partial tail block, text prefix."""
    pytest.importorskip("triton")
    layout = TokenLayout(2, 5, 7, text_len=6, text_where="prefix", batch=1)  # N = 76
    q, k, v = _qkv(layout, d=16)
    method = get_method("draft", pool=(4, 4), block_size=16, sparsity=0.5)
    plan = method.get_plan(q, k, layout, _ctx(layout))
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    torch.testing.assert_close(out, _manual(q, k, v, plan), atol=2e-4, rtol=2e-4)


def test_each_sample_gets_its_own_map_and_plans_follow_the_input():
    layout = TokenLayout(3, 4, 8, batch=2)
    q, k, _ = _qkv(layout)
    q[1], k[1] = q[1].flip(-2), k[1].roll(17, -2)  # the second sample has other contents
    method = get_method("draft", **SMALL)
    plan = method.get_plan(q, k, layout, _ctx(layout))
    blocks = plan.block_mask()
    assert not torch.equal(blocks[0], blocks[1])
    single = TokenLayout(3, 4, 8, batch=1)
    alone = method.get_plan(q[:1], k[:1], single, _ctx(single))
    assert torch.equal(alone.block_mask()[0], blocks[0])
    assert alone.perm is plan.perm  # the permutation is built once per layout (batch excluded)
    # dynamic: a new input gives a new selection at the next call
    q2, k2, _ = _qkv(layout, seed=5)
    assert not torch.equal(method.get_plan(q2, k2, layout, _ctx(layout)).block_mask(), blocks)


def test_no_host_sync_when_planning():
    layout = TokenLayout(3, 5, 7, text_len=6, text_where="prefix", batch=2)
    q, k, _ = _qkv(layout, dtype=torch.bfloat16)
    method = get_method("draft", **SMALL)
    with no_host_sync():
        method.get_plan(q, k, layout, _ctx(layout))  # first call: the permutation too
        method.get_plan(q, k, layout, _ctx(layout))


# ------------------------------------------------------------------ end to end on the tiny test DiTs
def test_tiny_wan_pipeline_with_cfg_steps():
    pipe = wan_pipeline()  # 4 x 8 x 8 = 256 video tokens per call
    with applied(pipe, "draft", pool=(4, 4), block_size=16, sparsity=0.5, dense_steps=1, dense_layers=0,
                 min_seq_len=0):  # fmt: skip
        latents = generate_latents(pipe, steps=3)
        rep = dit_sparse.report(pipe)
    assert bool(torch.isfinite(latents).all())
    assert rep.steps == 3 and rep.cfg_passes == ["cond", "uncond"]
    assert rep.dense_calls == 2 * 2 and rep.sparse_calls == 2 * 2 * 2  # step 0 dense, then 2 layers x 2 passes
    assert 0.3 < rep.density < 0.9


def test_tiny_cogvideox_batched_cfg_prefix_text():
    model, inputs = BUILDERS["cogvideox"]()  # batch 2 (a batched CFG pass), 16 text tokens then 128 video tokens
    ref = run(model, inputs)
    with applied(model, "draft", pool=(4, 4), block_size=16, sparsity=0.5, dense_steps=0, dense_layers=0,
                 min_seq_len=0):  # fmt: skip
        outs = [run(model, {**inputs, "timestep": inputs["timestep"] - 100 * i}) for i in range(3)]
        rep = dit_sparse.report(model)
    assert rep.steps == 3 and rep.sparse_calls == 3 * 2
    assert rep.density < 1.0
    assert all(bool(torch.isfinite(o).all()) for o in outs)
    assert not torch.equal(outs[0], ref)
