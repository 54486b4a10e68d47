"""Re-ttention: mask geometry, refresh and sparse steps against an independent float64 oracle, caches, end to end."""

from __future__ import annotations

import pytest
import torch

import dit_sparse
from dit_sparse.kernels import block_sparse_attention
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import get_method
from dit_sparse.methods.rettention import CACHE_KEY, RettentionConfig, rettention_block_mask
from dit_sparse.plan import BlockPlan, token_to_block_mask
from dit_sparse.state import GenerationState, StepContext

BLOCK = 8


# ------------------------------------------------------------------ independent statements
def official_token_mask(layout: TokenLayout, half: int) -> torch.Tensor:
    """The official CogVideoX mask (Re-ttention scripts/Vbench_category.py), written as its loops: each video token
    attends the in-frame positions [i - half, i + half] (clipped to the frame) of its own and every other frame;
    text rows and columns are dense."""
    n, p, v0 = layout.seq_len, layout.tokens_per_frame, layout.video_start
    mask = torch.zeros(n, n, dtype=torch.bool)
    text = layout.is_text()
    mask[text, :] = True
    mask[:, text] = True
    for j in range(layout.frames):
        for i in range(p):
            lo, hi = max(0, i - half), min(p, i + half + 1)
            for other in range(layout.frames):
                mask[v0 + j * p + i, v0 + other * p + lo : v0 + other * p + hi] = True
    return mask


def oracle(q, k, v, mask, scale=None):
    """float64: full output, in-mask softmax output, in-mask share of the softmax mass (rho)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(s, -1)
    ps = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return p @ v.double(), ps @ v.double(), (p * mask).sum(-1)


def make_kernel(log: list | None = None, backend: str = "reference"):
    """The processor's kernel closure, minus its bookkeeping (scale default, no key padding)."""

    def kernel(q, k, v, plan, return_lse=False, aux_work=False):
        if log is not None:
            log.append((plan.density(), return_lse))
        res = block_sparse_attention(q, k, v, plan, return_lse=return_lse, backend=backend)
        return res if return_lse else (res, None)

    return kernel


def qkv(layout: TokenLayout, batch: int = 1, heads: int = 2, dim: int = 8, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.seq_len, dim, generator=g).to(dtype) for _ in range(3)]


def ctx_at(step: int, layout: TokenLayout, cache: dict | None = None, cfg_pass: str = "cond") -> StepContext:
    return StepContext(step, None, cfg_pass, "blocks.0.attn1", 0, layout, {} if cache is None else cache)


LAYOUTS = {
    "none": TokenLayout(4, 3, 5),  # N = 60
    "prefix": TokenLayout(5, 4, 6, text_len=7, text_where="prefix"),  # N = 127: odd, not a block multiple
    "suffix": TokenLayout(5, 3, 7, text_len=5, text_where="suffix"),  # N = 110
}


def _method(**params):
    params = {"block_size": BLOCK, "window": 1, "dense_steps": 0, "refresh_interval": 5, **params}
    return get_method("rettention", **params)


# ------------------------------------------------------------------ geometry
@pytest.mark.parametrize("where", sorted(LAYOUTS))
@pytest.mark.parametrize("half", [0, 1, 4])
def test_mask_is_the_official_mask_at_block_granularity(where, half):
    layout = LAYOUTS[where]
    mask, perm = rettention_block_mask(layout, BLOCK, half)
    token = official_token_mask(layout, half)
    # exact: a block pair is kept iff one of its token pairs is in the official mask (position-major order)
    assert torch.equal(mask, token_to_block_mask(token[perm][:, perm], BLOCK, BLOCK))
    plan = BlockPlan.from_block_mask(mask, layout.seq_len, BLOCK, perm=perm).check()
    dense = plan.to_dense_mask()[0, 0]
    assert bool((dense | ~token).all())  # a superset of the official token mask
    text = layout.is_text()
    assert bool(dense[text].all()) and bool(dense[:, text].all())
    assert plan.density() < 0.95


def test_perm_is_position_major():
    layout = TokenLayout(3, 2, 2, text_len=2, text_where="prefix")
    _, perm = rettention_block_mask(layout, 4, 1)
    # text first, then all frames of position 0, of position 1, ... (original index 2 + t*4 + s)
    assert perm.tolist() == [0, 1, 2, 6, 10, 3, 7, 11, 4, 8, 12, 5, 9, 13]


@pytest.mark.parametrize(("grid", "text", "low", "high"), [((21, 30, 52), 0, 0.03, 0.05), ((21, 45, 80), 0, 0.03, 0.05),
                                                           ((11, 48, 85), 226, 0.03, 0.05)])  # fmt: skip
def test_default_density_at_real_shapes(grid, text, low, high):
    layout = TokenLayout(*grid, text_len=text, text_where="prefix" if text else "none")
    method = get_method("rettention")
    q = torch.zeros(1, 1, layout.seq_len, 1)
    plan = method.plan(q, q, layout, ctx_at(20, layout))
    assert low < plan.density() < high
    assert method.half_window(layout) == int(layout.tokens_per_frame * 0.03125) // 2


# ------------------------------------------------------------------ refresh and sparse steps
@pytest.mark.parametrize("where", sorted(LAYOUTS))
@pytest.mark.parametrize("batch", [1, 2])
def test_refresh_then_sparse_steps_follow_the_formula(where, batch):
    layout = LAYOUTS[where]
    method = _method(rho_step=0.04)
    q, k, v = qkv(layout, batch)
    plan = method.plan(q, k, layout, ctx_at(0, layout))
    mask = plan.to_dense_mask()[0, 0]
    full, sparse, rho = oracle(q, k, v, mask)
    cache: dict = {}
    log: list = []
    kernel = make_kernel(log)

    # step 0: refresh = dense attention exactly; rho = the in-mask softmax mass
    out = method.attend(q, k, v, layout, ctx_at(0, layout, cache), kernel)
    torch.testing.assert_close(out.double(), full, atol=1e-5, rtol=1e-5)
    entry = cache[CACHE_KEY].entries[0]
    torch.testing.assert_close(entry.rho.double(), rho, atol=1e-6, rtol=1e-5)
    assert entry.rho.dtype == torch.float32 and entry.residual.dtype == q.dtype
    assert [r for _, r in log] == [True, True] and log[0][0] == 1.0 and log[1][0] < 0.95  # dense + sparse, with LSE
    assert bool((rho < 1 - 1e-3).any())  # the mask really misses mass

    # step 1 (first sparse step, rho unchanged): same q/k/v -> dense again, through R
    log.clear()
    out = method.attend(q, k, v, layout, ctx_at(1, layout, cache), kernel)
    torch.testing.assert_close(out.double(), full, atol=1e-5, rtol=1e-5)
    assert log == [(log[0][0], False)]  # one sparse launch, no LSE

    # steps 2, 3 with new q/k/v: rho' · S + R, rho' = rho + 0.04 · (sparse steps since the refresh - 1)
    residual = full - rho.unsqueeze(-1) * sparse
    complete = mask.all(-1)  # rows the plan covers entirely keep rho = 1
    for step, seed in [(2, 1), (3, 2)]:
        q2, k2, v2 = qkv(layout, batch, seed=seed)
        _, sparse2, _ = oracle(q2, k2, v2, mask)
        ref_sparse = block_sparse_attention(q2, k2, v2, plan, backend="reference").double()
        torch.testing.assert_close(ref_sparse, sparse2, atol=1e-5, rtol=1e-5)
        grown = torch.where(complete, rho, rho + 0.04 * (step - 1))
        expected = grown.unsqueeze(-1) * ref_sparse + residual
        out = method.attend(q2, k2, v2, layout, ctx_at(step, layout, cache), kernel)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if layout.text_len:
        assert bool(complete[layout.is_text()].all())


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_backends_agree_with_reference(backend):
    """The refresh's LSEs (rho) and both steps' outputs are the same on every kernel backend (Triton: interpreter)."""
    if backend == "triton":
        pytest.importorskip("triton")
    layout = LAYOUTS["prefix"]
    q, k, v = qkv(layout, 2, dim=16)
    q2, k2, v2 = qkv(layout, 2, dim=16, seed=5)
    results = []
    for name in ("reference", backend):
        method, cache = _method(block_size=16), {}
        out0 = method.attend(q, k, v, layout, ctx_at(0, layout, cache), make_kernel(backend=name))
        out2 = method.attend(q2, k2, v2, layout, ctx_at(2, layout, cache), make_kernel(backend=name))
        results.append((out0, out2, cache[CACHE_KEY].entries[0].rho))
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_no_host_sync_on_refresh_and_sparse_steps():
    from host_sync import no_host_sync

    layout = LAYOUTS["suffix"]
    method, cache = _method(), {}
    q, k, v = qkv(layout, 2)
    for step in range(3):  # the first calls build and check the plans (one sync each, once per layout)
        method.attend(q, k, v, layout, ctx_at(step, layout, cache), make_kernel())
    with no_host_sync():
        for step in (3, 5):  # a sparse step with rho grown, a refresh step
            method.attend(q, k, v, layout, ctx_at(step, layout, cache), make_kernel())
    assert cache[CACHE_KEY].entries[0].step == 5


def test_schedule():
    method = get_method("rettention")  # dense 15, refresh every 5
    due, last = [], None
    for step in range(15, 50):
        if method.refresh_due(step, last):
            due.append(step)
            last = step
    assert due == list(range(15, 50, 5))
    assert method.refresh_due(15, None)  # nothing cached: refresh
    assert not method.refresh_due(17, 15) and not method.refresh_due(15, 15)
    assert method.refresh_due(22, 16)  # a missed refresh (step 20 skipped): stale after refresh_interval steps
    assert method.cycle_steps == 5 and not method.needs_lse
    cfg = RettentionConfig()
    assert (cfg.window_fraction, cfg.refresh_interval, cfg.rho_step, cfg.warmup_steps(50), cfg.dense_layers) == (
        0.03125, 5, 0.04, 15, 0)  # fmt: skip


def test_schedule_in_attend_and_refresh_every_step():
    layout = LAYOUTS["none"]
    q, k, v = qkv(layout)
    for interval, refreshes in [(2, [0, 2, 4, 6]), (1, list(range(7)))]:
        method = _method(refresh_interval=interval, dense_steps=0)
        cache: dict = {}
        seen = []
        for step in range(7):
            log: list = []
            method.attend(q, k, v, layout, ctx_at(step, layout, cache), make_kernel(log))
            if len(log) == 2:
                seen.append(step)
        assert seen == refreshes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype):
    layout = LAYOUTS["prefix"]
    method = _method()
    q, k, v = qkv(layout, 2, dtype=dtype)
    full = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    cache: dict = {}
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for step in range(2):  # refresh, then the first sparse step on the same q/k/v
        out = method.attend(q, k, v, layout, ctx_at(step, layout, cache), make_kernel())
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), full, atol=tol, rtol=tol)
    entry = cache[CACHE_KEY].entries[0]
    assert entry.residual.dtype == dtype and entry.rho.dtype == torch.float32


def test_cfg_passes_and_calls_keep_separate_caches():
    layout = LAYOUTS["suffix"]
    method = _method()
    state = GenerationState()
    state.begin(900.0, layout, "cond")
    a, b = qkv(layout, seed=3), qkv(layout, seed=4)
    kernel = make_kernel()
    # step 0: cond sees a, uncond sees b (separate (layer, pass) caches)
    for name, x in (("cond", a), ("uncond", b)):
        method.attend(*x, layout, ctx_at(0, layout, state.layer_cache("blocks.0.attn1", name), name), kernel)
    assert state.layer_cache("blocks.0.attn1", "cond") is not state.layer_cache("blocks.0.attn1", "uncond")
    for name, x in (("cond", a), ("uncond", b)):  # step 1: each pass restores its own dense output
        cache = state.layer_cache("blocks.0.attn1", name)
        out = method.attend(*x, layout, ctx_at(1, layout, cache, name), kernel)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(*x), atol=1e-5, rtol=1e-5)
    # two calls per step in one pass (Mochi loops over the batch): one entry per call, in call order
    cache: dict = {}
    for step in range(2):
        for x in (a, b):
            out = method.attend(*x, layout, ctx_at(step, layout, cache), kernel)
            torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(*x), atol=1e-5, rtol=1e-5)
    assert len(cache[CACHE_KEY].entries) == 2


def test_new_generation_clears_the_cache():
    layout = LAYOUTS["none"]
    method = _method()
    state = GenerationState()
    q, k, v = qkv(layout)
    for t in (900.0, 800.0):
        state.begin(t, layout, "cond")
        method.attend(q, k, v, layout, ctx_at(state.step, layout, state.layer_cache("l", "cond")), make_kernel())
    assert state.layer_cache("l", "cond")[CACHE_KEY].entries[0].step == 0
    state.begin(900.0, layout, "cond")  # the timestep jumps back up: a new generation
    assert state.step == 0 and CACHE_KEY not in state.layer_cache("l", "cond")
    state.reset()  # Diffusers' reset after a pipeline call
    assert state.cache == {}
    # a cache built for another shape or dtype is not reused
    cache: dict = {}
    method.attend(q, k, v, layout, ctx_at(0, layout, cache), make_kernel())
    log: list = []
    q2, k2, v2 = qkv(layout, batch=2)
    method.attend(q2, k2, v2, layout, ctx_at(1, layout, cache), make_kernel(log))
    assert len(log) == 2  # refreshed


def test_bad_hyper_parameters():
    for params, match in [
        ({"refresh_interval": 0}, "refresh_interval"),
        ({"refresh_interval": 2.5}, "refresh_interval"),
        ({"window_fraction": 1.5}, "window_fraction"),
        ({"window": -1}, "window"),
        ({"window": 2.0}, "window"),
        ({"rho_step": -0.1}, "rho_step"),
        ({"dense_steps": -1}, "dense_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            get_method("rettention", **params)
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        get_method("rettention", sparsity=0.03)


# ------------------------------------------------------------------ end to end on the tiny Wan transformer
def test_end_to_end_tiny_wan():
    from tiny_dit import BUILDERS

    model, inputs = BUILDERS["wan"]()  # grid 4×8×8 = 256 video tokens, 2 layers
    with torch.no_grad():
        dense = model(**inputs)[0]
    params = dict(block_size=16, min_seq_len=0, dense_steps=1, refresh_interval=3, window=1)
    dit_sparse.apply(model, "rettention", **params)
    try:
        outs, reps = [], []
        with torch.no_grad():
            for i in range(5):  # steps: 0 dense, 1 refresh, 2 sparse (rho), 3 sparse (rho + 0.04), 4 refresh
                with model.cache_context("cond", step_index=i):
                    outs.append(model(**inputs)[0])
                reps.append(dit_sparse.report(model, reset=True))
    finally:
        dit_sparse.remove(model)
    for i in (0, 1, 2, 4):  # same inputs every step: dense, refresh, first sparse step and refresh are all exact
        torch.testing.assert_close(outs[i], dense, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outs[3], dense, atol=1e-4)  # rho grew: no longer the dense output
    assert reps[0].dense_calls == 2 and reps[0].sparse_calls == 0
    assert all(r.sparse_calls == 2 for r in reps[1:])
    d = reps[2].density
    assert 0 < d < 0.6 and reps[3].density == pytest.approx(d)  # sparse steps: the plan's density
    for r in (reps[1], reps[4]):  # refresh: the dense output (density 1) and the sparse pass for the statistics
        assert r.density == pytest.approx(1.0) and r.aux_density == pytest.approx(d)
        assert "work besides the outputs" in str(r)
    assert reps[2].aux_density == 0


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video", "ltx", "mochi"])
def test_end_to_end_families(family):
    """Text prefix with batched CFG (CogVideoX), padded text suffix (HunyuanVideo: key padding), packed tokens (LTX),
    per-sample attention calls (Mochi: two calls per layer and step, one cache each)."""
    from tiny_dit import BUILDERS

    from dit_sparse.state import get_tracker

    model, inputs = BUILDERS[family]()
    with torch.no_grad():
        dense = model(**inputs)[0]
    dit_sparse.apply(model, "rettention", block_size=16, min_seq_len=0, dense_steps=0, refresh_interval=5, window=1)
    try:
        outs, reps = [], []
        with torch.no_grad():
            for i in range(3):  # refresh, first sparse step (exact on unchanged inputs), sparse step with rho grown
                with model.cache_context("cond", step_index=i):
                    outs.append(model(**inputs)[0])
                reps.append(dit_sparse.report(model, reset=True))
        caches = [c[CACHE_KEY] for c in get_tracker(model).state.cache.values()]
    finally:
        dit_sparse.remove(model)
    assert caches and all(len(c.entries) == (2 if family == "mochi" else 1) for c in caches)
    torch.testing.assert_close(outs[0], dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1], dense, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outs[2], dense, atol=1e-4)
    assert reps[0].density == pytest.approx(1.0) and reps[0].aux_density > 0  # refresh: dense output + statistics
    assert 0 < reps[1].density < 1 and reps[2].density == pytest.approx(reps[1].density)


def test_end_to_end_wan_pipeline_cfg():
    from tiny_dit import BUILDERS, generate_latents, wan_pipeline

    from dit_sparse.state import get_tracker

    model, _ = BUILDERS["wan"]()
    pipe = wan_pipeline(model)

    def call():
        return generate_latents(pipe, steps=4)

    ref = call()
    dit_sparse.apply(pipe, "rettention", block_size=16, min_seq_len=0, dense_steps=1, refresh_interval=3, window=1)
    try:
        tracker = get_tracker(pipe.transformer)
        first = call()
        rep = dit_sparse.report(pipe)
        assert tracker.state.cache == {}  # Diffusers reset the stateful hook after the call: cache cleared
        second = call()
    finally:
        dit_sparse.remove(pipe)
    assert rep.cfg_passes == ["cond", "uncond"] and rep.steps == 4
    assert rep.dense_calls == 2 * 2 and rep.sparse_calls == 2 * 2 * 3
    assert 0 < rep.density < 1
    torch.testing.assert_close(first, second)  # a new generation starts from an empty cache
    assert torch.isfinite(first).all()
    rel = float((first - ref).norm() / ref.norm())
    assert rel < 0.5, rel
