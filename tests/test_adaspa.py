"""AdaSpa: top-k by exact block mass, LSE-cached search schedule, head-adaptive sparsity, kernels, end to end."""

from __future__ import annotations

import pytest
import torch
from host_sync import no_host_sync
from tiny_dit import BUILDERS, applied, generate_latents, run, wan_pipeline

import dit_sparse
from dit_sparse.kernels import block_sparse_attention
from dit_sparse.kernels.block_mass import block_mass
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import get_method
from dit_sparse.methods.adaspa import AdaSpaConfig
from dit_sparse.methods.selection import keep_count
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext

SMALL = dict(block_size=8, sparsity=0.6, dense_steps=1, search_interval=2)


def _qkv(layout: TokenLayout, heads: int = 2, d: int = 8, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.batch, heads, layout.seq_len, d, generator=g).to(dtype) for _ in range(3)]


def _manual(q, k, v, plan: BlockPlan) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~plan.to_dense_mask(), float("-inf")), -1) @ v.float()


class Recorder:
    """A kernel (reference backend) that records the plans it was handed."""

    def __init__(self) -> None:
        self.plans: list[tuple[BlockPlan, bool]] = []

    def __call__(self, q, k, v, plan, return_lse=False):
        self.plans.append((plan, return_lse))
        res = block_sparse_attention(q, k, v, plan, return_lse=return_lse, backend="reference")
        return res if return_lse else (res, None)


def test_config_defaults_are_the_papers_and_bad_values_fail():
    cfg = AdaSpaConfig()
    assert (cfg.sparsity, cfg.recall, cfg.block_size, cfg.warmup_steps(50), cfg.search_interval) == (
        0.8,
        0.8,
        64,
        10,
        20,
    )
    assert cfg.head_adaptive and cfg.dense_layers == 0
    for bad in (dict(sparsity=1.0), dict(sparsity=-0.2), dict(recall=1.5), dict(search_interval=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdaSpaConfig(**bad)
    with pytest.raises(TypeError, match="topk"):
        get_method("adaspa", topk=4)


def test_schedule_dense_pass_then_cached_lse_searches():
    """Steps 1..5 (dense_steps=1, interval 2): search at 1 (dense pass + LSE), reuse at 2, search at 3 with the
    cached LSE (no dense pass), reuse at 4, search at 5."""
    layout = TokenLayout(3, 4, 6, text_len=5, text_where="suffix", batch=2)  # N = 77
    q, k, v = _qkv(layout)
    method = get_method("adaspa", **SMALL)
    ctx = StepContext(1, None, "cond", "blocks.0.attn1", 0, layout)
    kernel = Recorder()
    out = method.attend(q, k, v, layout, ctx, kernel)
    ((full, lse_asked),) = kernel.plans
    assert lse_asked and full.density() == 1.0
    torch.testing.assert_close(out, _manual(q, k, v, full), atol=1e-5, rtol=1e-5)  # the search step is exact
    state = ctx.cache["adaspa"]
    lse, first = state.lse, state.plan
    first.check()
    ctx.step = 2
    kernel.plans.clear()
    method.attend(q, k, v, layout, ctx, kernel)
    assert kernel.plans == [(first, False)]  # plan reused
    ctx.step = 3
    kernel.plans.clear()
    q2, k2 = q + 0.3 * torch.randn_like(q), k + 0.3 * torch.randn_like(k)
    out3 = method.attend(q2, k2, v, layout, ctx, kernel)
    ((plan3, lse_asked),) = kernel.plans
    assert not lse_asked and plan3 is not first and ctx.cache["adaspa"].lse is lse  # no dense pass, LSE kept
    torch.testing.assert_close(out3, _manual(q2, k2, v, plan3), atol=1e-5, rtol=1e-5)
    # with unchanged q, k the cached LSE gives the same scores as a fresh one
    torch.testing.assert_close(block_mass(q, k, 8, lse)[0], block_mass(q, k, 8)[0], atol=1e-5, rtol=1e-4)
    ctx.step = 4
    assert method.plan(q, k, layout, ctx) is plan3
    ctx.step = 5
    with no_host_sync():
        assert method.plan(q, k, layout, ctx) is not plan3  # a later search step: torch only, no host read


def test_cached_lse_search_equals_fresh_search():
    layout = TokenLayout(2, 4, 6, batch=1)
    q, k, v = _qkv(layout, heads=3)
    fresh = get_method("adaspa", **SMALL)
    ctx_a = StepContext(1, None, "cond", "l", 0, layout)
    fresh.attend(q, k, v, layout, ctx_a, Recorder())  # dense pass LSE
    ctx_b = StepContext(1, None, "cond", "l", 0, layout)
    plan_b = fresh.plan(q, k, layout, ctx_b)  # no kernel: exact LSE computed in the scoring pass
    assert torch.equal(ctx_a.cache["adaspa"].plan.block_mask(), plan_b.block_mask())


@pytest.mark.parametrize("text_where", ["none", "prefix", "suffix"])
def test_topk_geometry(text_where):
    text = 0 if text_where == "none" else 5
    layout = TokenLayout(3, 5, 7, text_len=text, text_where=text_where, batch=2)  # odd N
    q, k, _ = _qkv(layout, heads=3)
    method = get_method("adaspa", **SMALL, head_adaptive=False)
    plan = method.plan(q, k, layout, StepContext(1, None, "cond", "l", 0, layout)).check()
    m = plan.num_kv_blocks
    blocks = plan.block_mask()
    is_text = layout.is_text()
    text_rows = torch.zeros(m, dtype=torch.bool)
    text_rows[torch.arange(layout.seq_len)[is_text] // 8] = True
    assert bool(blocks.diagonal(dim1=-2, dim2=-1).all())
    assert bool(blocks[..., text_rows, :].all() and blocks[..., :, text_rows].all())
    counts = plan.kv_num_blocks[..., ~text_rows]
    k_base = keep_count(0.4, m)
    assert bool((counts == k_base).all())  # the same count in every row (forced blocks inside it)
    token = plan.to_dense_mask()
    assert bool(token[:, :, is_text].all() and token[:, :, :, is_text].all())
    assert plan.density() < 0.9 and plan.density_hint == pytest.approx(0.4)
    # the picks are the top blocks by exact mass
    mass, _ = block_mass(q, k, 8)
    row = int((~text_rows).nonzero()[0, 0])
    picked = mass[0, 0, row][blocks[0, 0, row]]
    dropped = mass[0, 0, row][~blocks[0, 0, row]]
    forced = text_rows.clone()
    forced[row] = True
    assert bool(picked[~forced[blocks[0, 0, row]]].min() >= dropped.max())


def test_head_adaptive_sparsity():
    """4 heads: 2 concentrated (recall > 0.8) and 2 diffuse -> the 2 best go to (1+s)/2, the 2 worst to (3s-1)/2."""
    m = 20
    layout = TokenLayout(1, 1, 8 * m)  # 160 tokens, 20 blocks of 8, no text
    method = get_method("adaspa", block_size=8, sparsity=0.8)
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(1, 4, m, m, generator=g) * 0.01
    eye = torch.eye(m)
    mass[0, 0] += 5 * eye + 3 * eye.roll(1, -1)  # recall ~ 1 at 4 blocks per row
    mass[0, 1] += 5 * eye
    mass[0, 2] += 0.5  # flat: recall ~ 0.2
    mass[0, 3] += torch.linspace(0, 1, m)  # mildly sloped
    plan, recall, sparsity = method.select(mass / mass.sum(-1, keepdim=True), layout)
    assert bool((recall[0, :2] > 0.8).all() and (recall[0, 2:] < 0.8).all())
    torch.testing.assert_close(sparsity[0], torch.tensor([0.9, 0.9, 0.7, 0.7]))
    assert plan.kv_num_blocks[0].float().mean(-1).tolist() == [
        keep_count(0.1, m), keep_count(0.1, m), keep_count(0.3, m), keep_count(0.3, m)
    ]  # fmt: skip
    assert float(sparsity.mean()) == pytest.approx(0.8)  # the mean sparsity stays s
    # one easy head: only the best goes sparser and only the worst denser
    mass[0, 1] = 0.5
    _, recall, sparsity = method.select(mass / mass.sum(-1, keepdim=True), layout)
    worst = int(recall[0].argmin())
    expected = torch.full((4,), 0.8)
    expected[0], expected[worst] = 0.9, 0.7
    torch.testing.assert_close(sparsity[0], expected)
    # head_adaptive=False: every head at s
    flat = get_method("adaspa", block_size=8, sparsity=0.8, head_adaptive=False)
    _, _, sparsity = flat.select(mass / mass.sum(-1, keepdim=True), layout)
    assert bool((sparsity == 0.8).all())


@pytest.mark.parametrize(
    ("text_where", "dtype"), [("prefix", torch.float32), ("suffix", torch.float32), ("suffix", torch.bfloat16)]
)
def test_output_equals_reference_kernel_on_its_plan(text_where, dtype):
    layout = TokenLayout(3, 5, 7, text_len=6, text_where=text_where, batch=2)  # N = 111
    q, k, v = _qkv(layout, dtype=dtype)
    q[1] = q[1].flip(-2)  # the samples differ
    method = get_method("adaspa", **SMALL)
    ctx = StepContext(1, None, "cond_uncond", "l", 0, layout)
    method.attend(q, k, v, layout, ctx, Recorder())  # search step
    ctx.step = 2
    kernel = Recorder()
    out = method.attend(q, k, v, layout, ctx, kernel)
    ((plan, _),) = kernel.plans
    blocks = plan.block_mask()
    assert not torch.equal(blocks[0], blocks[1])  # one selection per sample
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _manual(q, k, v, plan), atol=tol, rtol=tol)


# ------------------------------------------------------------------ end to end on the tiny test DiTs
def test_tiny_wan_pipeline_with_cfg_steps():
    pipe = wan_pipeline()
    with applied(pipe, "adaspa", block_size=16, sparsity=0.6, dense_steps=1, search_interval=2, min_seq_len=0):
        latents = generate_latents(pipe, steps=4)
        rep = dit_sparse.report(pipe)
    assert bool(torch.isfinite(latents).all())
    assert rep.steps == 4 and rep.cfg_passes == ["cond", "uncond"]
    assert rep.dense_calls == 2 * 2 and rep.sparse_calls == 3 * 2 * 2
    # step 1 is a first search step (a dense pass), steps 2 and 3 run the plans: mean density below 1
    assert rep.density < 0.9


def test_tiny_cogvideox_batched_cfg_prefix_text():
    model, inputs = BUILDERS["cogvideox"]()  # batch 2 (a batched CFG pass), prefix text
    with applied(model, "adaspa", block_size=16, sparsity=0.5, dense_steps=0, min_seq_len=0):
        outs = [run(model, {**inputs, "timestep": inputs["timestep"] - 100 * i}) for i in range(3)]
        rep = dit_sparse.report(model)
    assert rep.steps == 3 and rep.sparse_calls == 3 * 2 and rep.density < 1.0
    assert all(bool(torch.isfinite(o).all()) for o in outs)


def test_a_skipped_search_step_searches_at_the_next_call():
    """A layer skipped at a search step (a Diffusers cache hit) searches at its next call; the first sparse call
    always searches, whatever dense_steps says."""
    layout = TokenLayout(2, 4, 6)
    q, k, v = _qkv(layout)
    method = get_method("adaspa", block_size=8, dense_steps=10, search_interval=20)
    ctx = StepContext(0, None, "cond", "l", 0, layout)
    method.attend(q, k, v, layout, ctx, Recorder())  # first call (dense_steps overridden by the caller): a search
    first = ctx.cache["adaspa"].plan
    for step, searched in [(9, False), (10, True), (29, False), (31, True), (32, False), (55, True)]:
        ctx.step = step
        before = ctx.cache["adaspa"].plan
        assert (method.plan(q, k, layout, ctx) is not before) == searched, step
    assert ctx.cache["adaspa"].step == 55 and first is not ctx.cache["adaspa"].plan
