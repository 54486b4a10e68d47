"""dit_sparse under torch.compile (CPU, inductor): regional (compile_repeated_blocks) and whole-transformer compilation
give the eager outputs, the per-step state still advances (dense warm-up step, CFG passes), nothing recompiles per
step, ``dense`` through dit_sparse equals the model's own processors compiled, and ``bench --compile`` runs."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_dit import BUILDERS, generate_latents, run, wan_pipeline

import dit_sparse
from dit_sparse import bench
from dit_sparse.processor import BINDING_ATTR, SparseProcessor

WINDOW = dict(tile=(1, 4, 4), window=(1, 0, 0), block_size=16, min_seq_len=0)
RADIAL = dict(block_size=16, min_window=16, decay=0.02, sink=False, min_seq_len=0, dense_layers=0)


@functools.cache
def _inductor_problem() -> str | None:
    """Why inductor cannot compile on this machine (no C++ compiler, ...), or None."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, backend="inductor", fullgraph=True)
        fn(torch.randn(16))
    except Exception as exc:  # noqa: BLE001 - any failure means: skip, with its reason
        return f"torch.compile(backend='inductor') does not work here: {type(exc).__name__}: {str(exc)[:200]}"
    return None


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    problem = _inductor_problem()
    if problem is not None:
        pytest.skip(problem)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _steps(model: Any, call: Any, inputs: dict[str, Any], n: int = 3) -> list[torch.Tensor]:
    """``n`` denoising steps of one CFG pass, the pipeline's way (cache context with the step index)."""
    outs = []
    with torch.no_grad():
        for i in range(n):
            with model.cache_context("cond", step_index=i):
                outs.append(call(**{**inputs, "timestep": inputs["timestep"] - 100.0 * i})[0])
    return outs


def test_regional_compile_window_pipeline_matches_eager():
    """A WanPipeline (3 steps, CFG, dense warm-up step) with compile_repeated_blocks gives the eager latents; steps and
    CFG passes advance; a second generation compiles nothing."""
    model, _ = BUILDERS["wan"]()
    pipe = wan_pipeline(model)
    dit_sparse.apply(pipe, "window", dense_steps=1, **WINDOW)
    try:
        ref = generate_latents(pipe, steps=3)
        eager = dit_sparse.report(pipe, reset=True)
        model.compile_repeated_blocks(backend="inductor")
        out = generate_latents(pipe, steps=3)
        compiled = dit_sparse.report(pipe, reset=True)
        graphs = _graphs()
        again = generate_latents(pipe, steps=3)
        assert _graphs() == graphs  # no recompilation per step, CFG pass or generation
        rep = dit_sparse.report(pipe)
    finally:
        dit_sparse.remove(pipe)
    assert graphs > 0  # it really was compiled
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, ref, rtol=1e-4, atol=1e-4)
    for r in (compiled, rep):
        assert (r.steps, r.generations, r.cfg_passes) == (3, 1, ["cond", "uncond"])
        assert (r.calls, r.dense_calls, r.sparse_calls) == (eager.calls, eager.dense_calls, eager.sparse_calls)
        assert r.dense_calls == 2 * 2 and r.sparse_calls == 2 * 2 * 2  # step 0 dense: 2 layers x 2 passes
        assert r.density == pytest.approx(eager.density) and 0 < r.density < 1
    assert not hasattr(model.blocks[0].attn1, BINDING_ATTR)  # remove() cleans up


def test_dense_through_dit_sparse_equals_native_under_compile():
    """``dense`` routed through dit_sparse (its attention a graph break) equals the model's own processors, both with
    the blocks compiled."""
    native, inputs = BUILDERS["wan"]()
    ours, _ = BUILDERS["wan"]()
    ref = _steps(native, native, inputs, 2)
    native.compile_repeated_blocks(backend="inductor")
    want = _steps(native, native, inputs, 2)
    dit_sparse.apply(ours, "dense", block_size=16, min_seq_len=0)
    try:
        ours.compile_repeated_blocks(backend="inductor")
        got = _steps(ours, ours, inputs, 2)
        rep = dit_sparse.report(ours)
    finally:
        dit_sparse.remove(ours)
    assert rep.sparse_calls == 4 and rep.density == pytest.approx(1.0) and rep.steps == 2
    for w, g, r in zip(want, got, ref, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w, r, rtol=1e-5, atol=1e-5)


def test_bench_compile_blocks_on_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """bench.run(..., compile="blocks") on a tiny Wan: eager and compiled figures side by side, warm-up absorbs the
    compilation, nothing compiles while timed; JSON and markdown carry both."""

    def tiny_inputs(model: Any, shape: bench.Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict, int]:
        inputs, tokens = bench._wan_inputs(model, shape, device, dtype)
        _, ours = BUILDERS["wan"]()  # 16 text tokens: the graphs compiled above (inductor's cache) serve again
        return {**inputs, "encoder_hidden_states": ours["encoder_hidden_states"].to(device, dtype)}, tokens

    spec = dataclasses.replace(
        bench.MODELS["wan2.1-1.3b"],
        config=dict(bench.MODELS["wan2.1-1.3b"].config, num_attention_heads=2, attention_head_dim=12, text_dim=32,
                    ffn_dim=32, num_layers=2, rope_max_seq_len=32),  # tiny_dit.wan
        shapes={"tiny": (13, 128, 128)},  # latent 4 x 16 x 16 -> 4 x 8 x 8 = 256 tokens
        make_inputs=tiny_inputs,
    )  # fmt: skip
    monkeypatch.setitem(bench.MODELS, "tiny-wan", spec)
    rows = bench.run(
        ["tiny-wan"], None, ["window:tile=1,4,4;window=1,0,0;block_size=16;min_seq_len=0"], 2, tmp_path / "e2e",
        "pytest", quick=True, compile="blocks", device="cpu",
    )  # fmt: skip
    assert [r.method for r in rows] == ["dense", "window"]
    dense, window = rows
    assert 0 < window.density < 1 and dense.extra["attention_ms"] > 0
    for r in rows:
        assert r.compile == "blocks" and r.compiled_ms > 0 and len(r.compiled_ms_all) == 2
        assert len(r.extra["compiled_warmup_s"]) == 2 and r.extra["compiled_graphs_while_timed"] == 0
        assert 0 < r.compiled_attention_share <= 1
        assert r.compiled_amdahl_limit == pytest.approx(
            1 / ((1 - r.compiled_attention_share) + r.compiled_attention_share * r.density)
        )
        assert r.compiled_speedup == pytest.approx(dense.compiled_ms / r.compiled_ms)
        assert r.compiled_speedup_vs_eager == pytest.approx(dense.forward_ms / r.compiled_ms)
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["rows"][1]["compiled_ms"] == window.compiled_ms and data["rows"][1]["forward_ms"] == window.forward_ms
    md = (tmp_path / "e2e.md").read_text()
    assert "| compiled ms | vs compiled dense | vs eager dense |" in md
    assert "warm-up forwards (compilation included)" in md and "no graph compiled while timed" in md
    assert md.count("| tiny-wan | tiny | 256 |") == 2


def test_set_attn_processor_way_under_compile():
    """The Diffusers way (set_attn_processor(SparseProcessor())): with regional compilation it binds on the first call;
    with the whole transformer compiled it needs dit_sparse.apply or one eager forward first (a clear error otherwise),
    then radial gives the eager outputs step by step (step 0 dense) and a second generation compiles nothing."""
    model, inputs = BUILDERS["wan"]()
    ref = _steps(model, model, inputs, 1)
    model.set_attn_processor(SparseProcessor("dense", block_size=16, min_seq_len=0))
    model.compile_repeated_blocks(backend="eager")  # Dynamo only: inductor is covered above
    try:
        out = _steps(model, model, inputs, 1)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert rep.sparse_calls == 2 and rep.steps == 1
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)

    model, inputs = BUILDERS["wan"]()
    dit_sparse.apply(model, "radial", dense_steps=1, **RADIAL)
    ref = _steps(model, model, inputs)
    dit_sparse.remove(model)
    model.set_attn_processor(SparseProcessor("radial", dense_steps=1, **RADIAL))
    compiled = torch.compile(model, backend="aot_eager")  # inductor itself: the tests above (CPU compile time)
    try:
        with pytest.raises(TypeError, match=r"outside the forward of a supported transformer.*dit_sparse\.apply"):
            run(compiled, inputs)
        run(model, inputs)  # one eager forward tracks the transformer
        outs = _steps(model, compiled, inputs)
        dit_sparse.report(model, reset=True)
        graphs = _graphs()
        again = _steps(model, compiled, inputs)  # step index back to 0: a new generation
        assert _graphs() == graphs  # no recompilation per step or generation
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    for a, b, c in zip(ref, outs, again, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
    assert (ref[1] - ref[0]).abs().max() > 1e-3  # the steps differ, so the comparison means something
    assert (rep.generations, rep.steps, rep.dense_calls, rep.sparse_calls) == (1, 3, 2, 4) and 0 < rep.density < 1


def test_first_sighting_hooks_live_until_the_transformer_is_found():
    """The Diffusers way installs the process-wide first-sighting hooks only while a processor waits for its
    transformer: found at the first forward, they are gone; a processor freed by the garbage collector (possibly in
    the middle of a torch.compile, whose guards read the global hook dicts) leaves them until the next eager module
    call; dit_sparse.apply never installs them."""
    import gc

    from dit_sparse.finder import FINDER

    model, inputs = BUILDERS["wan"]()
    dit_sparse.apply(model, "dense", block_size=16, min_seq_len=0)
    assert not FINDER.installed
    run(model, inputs)
    dit_sparse.remove(model)
    model.set_attn_processor(SparseProcessor("dense", block_size=16, min_seq_len=0))
    assert FINDER.installed
    run(model, inputs)  # found: the transformer's own hook from now on
    assert not FINDER.installed
    run(model, inputs)
    assert dit_sparse.report(model).steps == 1 and dit_sparse.report(model).calls == 4
    dit_sparse.remove(model)
    processor = SparseProcessor("dense")
    assert FINDER.installed
    del processor
    gc.collect()
    assert FINDER.installed  # not removed by the finalizer
    torch.nn.Identity()(torch.zeros(1))  # the next eager module call
    assert not FINDER.installed


def test_pinned_non_sdpa_backend_under_compile():
    """A pinned non-SDPA Diffusers backend is the same clear error compiled as eager."""
    model, inputs = BUILDERS["wan"]()
    dit_sparse.apply(model, "dense", block_size=64)
    model.compile_repeated_blocks(backend="eager")
    model.set_attention_backend("flex")
    try:
        with pytest.raises(RuntimeError, match=r"made no torch scaled_dot_product_attention call.*'flex'"):
            run(model, inputs)
    finally:
        model.set_attention_backend("native")  # also the global active backend
        model.reset_attention_backend()
        dit_sparse.remove(model)


def test_cli_bench_compile_option(monkeypatch: pytest.MonkeyPatch):
    from dit_sparse.cli import main

    seen: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", lambda *a, **k: seen.append((a, k)))
    argv = ["bench", "--models", "wan2.1-1.3b", "--shapes", "720p", "--methods", "window", "--compile", "blocks"]
    assert main(argv) == 0
    (models, shapes, methods, _, out, _), kwargs = seen[0]
    assert kwargs == {"quick": False, "compile": "blocks"} and out.endswith("-compile-blocks")
    assert (models, shapes, methods) == (["wan2.1-1.3b"], ["720p"], ["window"])
    with pytest.raises(SystemExit):
        main(["bench", "--compile", "max-autotune"])


# ---------------------------------------------------------------------------------------------- no graph breaks
BREAK_FREE = {
    "dense": dict(block_size=16, min_seq_len=0),
    "window": dict(dense_steps=1, **WINDOW),
    "radial": dict(dense_steps=1, **RADIAL),
    "svdit": dict(default_mode="diagonal", block_size=16, min_seq_len=0, dense_steps=1),
    "draft": dict(block_size=16, pool=(4, 4), min_seq_len=0, dense_steps=1, dense_layers=0),
    "adaspa": dict(block_size=16, min_seq_len=0, dense_steps=1),
    "rettention": dict(block_size=16, min_seq_len=0, dense_steps=1),
}


def _generations(model: Any, call: Any, inputs: dict[str, Any], n: int = 2, steps: int = 3) -> list[torch.Tensor]:
    """``n`` generations of ``steps`` steps with two CFG passes each, the pipeline's way (named cache contexts)."""
    outs = []
    with torch.no_grad():
        for _ in range(n):
            for i in range(steps):
                for name in ("cond", "uncond"):
                    with model.cache_context(name):
                        outs.append(call(**{**inputs, "timestep": inputs["timestep"] - 100.0 * i})[0])
    return outs


@pytest.mark.parametrize("method", list(BREAK_FREE))
def test_no_graph_break_for_any_method(method: str):
    """torch._dynamo.explain of a whole Wan transformer forward: 0 graph breaks, static and dynamic methods alike (the
    self-attention call and the tracker's bookkeeping are custom ops, dit_sparse.graph)."""
    model, inputs = BUILDERS["wan"]()
    model.requires_grad_(False)
    dit_sparse.apply(model, method, **BREAK_FREE[method])
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(**inputs)
    finally:
        dit_sparse.remove(model)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("family", list(BUILDERS))
def test_fullgraph_whole_transformer_never_recompiles(family: str):
    """Diffusers' own compile test, with dit_sparse applied: torch.compile(transformer, fullgraph=True) of every family
    with radial compiles once; two generations (dense warm-up step, sparse steps, CFG passes) under
    error_on_recompile give the eager outputs and the eager report, twice."""
    model, inputs = BUILDERS[family]()
    model.requires_grad_(False)
    params = BREAK_FREE["radial"]
    dit_sparse.apply(model, "radial", **params)
    eager = _generations(model, model, inputs)
    want = dit_sparse.report(model, reset=True)
    dit_sparse.apply(model, "radial", **params)  # a fresh generation state
    before = _graphs()
    try:
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        first = _generations(model, compiled, inputs)
        graphs = _graphs() - before
        got = dit_sparse.report(model, reset=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = _generations(model, compiled, inputs)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert graphs == 1 and _graphs() - before == 1
    for r in (got, rep):
        assert (r.steps, r.generations, r.cfg_passes) == (want.steps, want.generations, want.cfg_passes) == (
            6, 2, ["cond", "uncond"])  # fmt: skip
        assert (r.calls, r.dense_calls, r.sparse_calls) == (want.calls, want.dense_calls, want.sparse_calls)
        assert r.density == pytest.approx(want.density) and 0 < r.density <= 1
    for a, b, c in zip(eager, first, again, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_regional_fullgraph_one_graph_for_every_block_and_step():
    """compile_repeated_blocks(fullgraph=True) with adaspa (dynamic: search steps, cached plans): one graph serves
    every block, the dense -> sparse switch and the search/reuse steps recompile nothing (count: 0)."""
    model, inputs = BUILDERS["wan"]()
    model.requires_grad_(False)
    dit_sparse.apply(model, "adaspa", **BREAK_FREE["adaspa"])
    eager = _generations(model, model, inputs, n=1)
    dit_sparse.apply(model, "adaspa", **BREAK_FREE["adaspa"])
    before = _graphs()
    try:
        model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = _generations(model, model, inputs, n=1)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert _graphs() - before == 1
    assert rep.dense_calls == 2 * 2 and rep.sparse_calls == 2 * 2 * 2
    for a, b in zip(eager, out, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_training_under_compile_keeps_the_graph_break():
    """With gradients flowing the self-attention call stays the eager graph break (the ops have no autograd
    formula), and the gradients are the eager ones."""
    model, inputs = BUILDERS["wan"]()
    dit_sparse.apply(model, "window", dense_steps=0, **WINDOW)
    try:
        explained = torch._dynamo.explain(model)(**inputs)
        model.zero_grad()
        model(**inputs)[0].square().mean().backward()
        want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        torch.compile(model, backend="aot_eager")(**inputs)[0].square().mean().backward()
        got = [p.grad for p in model.parameters() if p.grad is not None]
    finally:
        dit_sparse.remove(model)
    assert explained.graph_break_count > 0
    assert len(got) == len(want) > 0
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_kernel_op_fake_shapes_and_compiled_call():
    """block_sparse_attention traced is the custom op dit_sparse::block_sparse_attention: torch.library.opcheck
    passes (fake shapes, schema), a compiled call (inductor) has no break and gives the eager output and LSE, and
    the op finds the plan object its tensors belong to."""
    from dit_sparse.kernels import block_sparse_attention
    from dit_sparse.kernels.ops import _op
    from dit_sparse.plan import BlockPlan

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 100, 16, generator=g).transpose(1, 2).contiguous().transpose(1, 2) for _ in "qkv")
    mask = (torch.rand(4, 4, generator=g) < 0.5) | torch.eye(4, dtype=torch.bool)
    plan = BlockPlan.from_block_mask(mask, 100, 32, perm=torch.randperm(100, generator=g), head_mode=(0, 2, 0))
    assert BlockPlan.owning(plan.kv_num_blocks, plan.kv_indices) is plan
    assert BlockPlan.owning(plan.kv_num_blocks, plan.kv_indices.clone()) is None
    ref, ref_lse = block_sparse_attention(q, k, v, plan, return_lse=True)
    args = (q, k, v, plan.kv_num_blocks, plan.kv_indices, plan.perm, plan.inv_perm, None, 32, 32, [0, 2, 0], None,
            0.25, "reference", "bf16")  # fmt: skip
    torch.library.opcheck(_op, args)
    fn = lambda q, k, v: block_sparse_attention(q, k, v, plan, return_lse=True)  # noqa: E731
    assert torch._dynamo.explain(fn)(q, k, v).graph_break_count == 0
    torch._dynamo.reset()
    out, lse = torch.compile(fn, backend="inductor", fullgraph=True)(q, k, v)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert (out[:, 1] == 0).all() and torch.isinf(lse[:, 1]).all()  # the skipped head
