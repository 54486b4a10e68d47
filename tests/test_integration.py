"""SparseProcessor / apply / remove / report end to end: a tiny WanPipeline, per-step state, policy, errors."""

from __future__ import annotations

import inspect

import pytest
import torch
from tiny_dit import BUILDERS, flux_image, generate_latents, run, wan_pipeline

import dit_sparse
from dit_sparse.layout import TokenLayout
from dit_sparse.processor import SparseProcessor
from dit_sparse.state import GenerationState, get_tracker


@pytest.fixture(scope="module")
def wan_pipe():
    model, inputs = BUILDERS["wan"]()
    return wan_pipeline(model), inputs


def test_wan_pipeline_window_steps_passes_and_reset(wan_pipe):
    pipe, _ = wan_pipe
    dit_sparse.apply(pipe, "window", tile=(1, 4, 4), window=(1, 0, 0), block_size=16, min_seq_len=0)
    tracker = get_tracker(pipe.transformer)
    seen = []
    orig_begin = tracker.state.begin

    def spy(timestep, shape_key, context_name=None, step_index=None):
        orig_begin(timestep, shape_key, context_name, step_index)
        seen.append((tracker.state.generation, tracker.state.step, tracker.state.cfg_pass, len(tracker.state.cache)))

    tracker.state.begin = spy
    try:
        generate_latents(pipe)
        rep = dit_sparse.report(pipe, reset=True)
        assert tracker.state.fresh  # Diffusers reset the stateful hook after the call
        generate_latents(pipe)
        rep2 = dit_sparse.report(pipe)
    finally:
        dit_sparse.remove(pipe)
    assert [s[:3] for s in seen] == [
        (1, 0, "cond"), (1, 0, "uncond"), (1, 1, "cond"), (1, 1, "uncond"),
        (2, 0, "cond"), (2, 0, "uncond"), (2, 1, "cond"), (2, 1, "uncond"),
    ]  # fmt: skip
    assert seen[4][3] == 0  # the second call starts with an empty cache
    for r in (rep, rep2):
        assert r.steps == 2 and r.generations == 1 and r.cfg_passes == ["cond", "uncond"]
        assert r.calls == r.sparse_calls == 2 * 2 * 2 and len(r.transformer_ms) == 4
        assert 0 < r.density < 1 and r.attn_error == {}
    assert "blocks.0.attn1" in str(rep)


def test_first_block_cache_skips_do_not_corrupt_state(wan_pipe):
    from diffusers import FirstBlockCacheConfig

    pipe, _ = wan_pipe
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # skips every block after the first
    dit_sparse.apply(pipe, "window", tile=(1, 4, 4), window=(1, 0, 0), block_size=16, min_seq_len=0)
    try:
        generate_latents(pipe, steps=3)
        rep = dit_sparse.report(pipe)
    finally:
        dit_sparse.remove(pipe)
        pipe.transformer.disable_cache()
    assert rep.steps == 3 and rep.cfg_passes == ["cond", "uncond"] and len(rep.transformer_ms) == 6
    assert rep.per_layer["blocks.0.attn1"]["calls"] == 6
    assert rep.per_layer.get("blocks.1.attn1", {"calls": 0})["calls"] < 6


def test_policy_dense_steps_layers_and_short_sequences(wan_pipe):
    _, inputs = wan_pipe
    model, _ = BUILDERS["wan"]()
    ref = run(model, inputs)
    window = dict(tile=(1, 4, 4), window=(1, 0, 0), block_size=16)
    dit_sparse.apply(model, "window", **window)  # default min_seq_len 1024 > 256 tokens: all dense
    out = run(model, inputs)
    rep = dit_sparse.report(model, reset=True)
    assert rep.dense_calls == rep.calls == 2 and rep.sparse_calls == 0 and torch.equal(out, ref)
    dit_sparse.apply(model, "window", min_seq_len=0, dense_layers=1, **window)
    run(model, inputs)
    rep = dit_sparse.report(model, reset=True)
    assert rep.per_layer["blocks.0.attn1"]["dense_calls"] == 1 and rep.per_layer["blocks.1.attn1"]["sparse_calls"] == 1
    dit_sparse.apply(model, "window", min_seq_len=0, dense_steps=1, **window)
    run(model, inputs)  # step 0: dense
    run(model, {**inputs, "timestep": inputs["timestep"] - 100})  # step 1: sparse
    rep = dit_sparse.report(model)
    dit_sparse.remove(model)
    assert (rep.dense_calls, rep.sparse_calls, rep.steps) == (2, 2, 2)


def test_generation_state_rules():
    lay, lay2 = TokenLayout(2, 4, 4), TokenLayout(2, 4, 8)
    s = GenerationState()
    s.begin(900.0, lay)
    s.layer_cache("a", s.cfg_pass)["x"] = 1
    s.begin(900.0, lay)  # same timestep: another CFG pass of step 0
    assert (s.generation, s.step, s.cfg_pass, s.passes) == (1, 0, "pass1", ["pass0", "pass1"])
    s.begin(500.0, lay)
    assert (s.generation, s.step, s.cfg_pass, s.steps_seen) == (1, 1, "pass0", 2) and s.cache
    s.begin(950.0, lay)  # timestep jumps back up: new generation, empty cache
    assert (s.generation, s.step, s.cache) == (2, 0, {})
    s.begin(500.0, lay2)  # new shapes: new generation
    assert (s.generation, s.step) == (3, 0)
    s.reset()
    s.begin(400.0, lay2, "cond", 0)
    assert (s.generation, s.step, s.cfg_pass) == (4, 0, "cond")
    s.begin(400.0, lay2, "uncond", 0)
    s.begin(300.0, lay2, "cond", 5)  # pipeline step index wins over counting
    assert (s.generation, s.step, s.passes) == (4, 5, ["cond", "uncond"])
    s.begin(200.0, lay2, "cond", 2)  # step index goes back: new generation
    assert (s.generation, s.step) == (5, 2)


def test_error_sampling_dense_is_exact(wan_pipe):
    _, inputs = wan_pipe
    model, _ = BUILDERS["wan"]()
    dit_sparse.apply(model, "dense", block_size=64, error_sample=2)
    run(model, inputs)
    rep = dit_sparse.report(model)
    dit_sparse.remove(model)
    assert rep.attn_error["out_rel_l2"] < 1e-6 and rep.attn_error["lse_rel_l2"] < 1e-6
    assert "out_rel_l2" in rep.per_layer["blocks.0.attn1"] and "out_rel_l2" not in rep.per_layer["blocks.1.attn1"]


def test_processor_signature_covers_native_processors():
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        CogVideoXAttnProcessor2_0,
        MochiAttnProcessor2_0,
    )
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    ours = set(inspect.signature(SparseProcessor().__call__).parameters)
    for cls in (WanAttnProcessor, CogVideoXAttnProcessor2_0, HunyuanVideoAttnProcessor2_0, LTXVideoAttnProcessor,
                MochiAttnProcessor2_0, AttnProcessor2_0):  # fmt: skip
        named = {
            p.name
            for p in inspect.signature(cls.__call__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        assert named <= ours, (cls.__name__, named - ours)
    assert SparseProcessor._attention_backend is None and SparseProcessor._parallel_config is None
    assert SparseProcessor().method.name == dit_sparse.DEFAULT_METHOD


# ------------------------------------------------------------------------------------------------ clear errors
def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match=r"unknown sparse-attention method 'nope'.*dense.*window"):
        SparseProcessor("nope")


def test_unknown_and_out_of_range_hyper_parameters(wan_pipe):
    pipe, _ = wan_pipe
    with pytest.raises(TypeError, match=r"unknown hyper-parameter\(s\) tile_size.*takes:.*tile"):
        dit_sparse.apply(pipe, "window", tile_size=4)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        dit_sparse.apply(pipe, "dense", block_size=0)
    with pytest.raises(ValueError, match="holds 32 tokens but block_size is 16"):
        dit_sparse.apply(pipe, "window", tile=(2, 4, 4), block_size=16)
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        dit_sparse.apply(pipe, "dense", backend="cuda")
    assert get_tracker(pipe.transformer) is None  # nothing was changed


def test_unsupported_transformer_lists_supported():
    model, inputs = flux_image()
    with pytest.raises(TypeError, match=r"does not support FluxTransformer2DModel.*WanTransformer3DModel"):
        dit_sparse.apply(model, "dense")
    with pytest.raises(TypeError, match=r"neither a transformer nor a pipeline"):
        dit_sparse.apply(object(), "dense")
    # the Diffusers way on an unsupported model fails at the first call, naming the supported ones
    model.set_attn_processor(SparseProcessor("dense"))
    with pytest.raises(TypeError, match=r"supported transformers: CogVideoXTransformer3DModel"):
        run(model, inputs)


def test_pinned_non_sdpa_backend_is_an_error(wan_pipe):
    _, inputs = wan_pipe
    model, _ = BUILDERS["wan"]()
    dit_sparse.apply(model, "dense", block_size=64)
    model.set_attention_backend("flex")
    try:
        with pytest.raises(
            RuntimeError,
            match=r"made no torch scaled_dot_product_attention call.*'flex'.*set_attention_backend\('native'\)",
        ):
            run(model, inputs)
        model.set_attention_backend("native")
        run(model, inputs)  # back to SDPA: fine
    finally:
        model.set_attention_backend("native")  # also the global active backend
        model.reset_attention_backend()
        dit_sparse.remove(model)


def test_unsupported_mask_dropout_are_errors():
    model, inputs = BUILDERS["wan"]()
    dit_sparse.apply(model, "dense", block_size=64)
    attn = model.blocks[0].attn1
    proc = attn.processor
    native = proc.native_of(attn)
    native_call = type(native).__call__

    def masked(self, attn_, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        n = hidden_states.shape[1]
        return native_call(self, attn_, hidden_states, encoder_hidden_states, torch.ones(1, 1, n, n, dtype=torch.bool),
                           rotary_emb)  # fmt: skip

    native.__class__ = type("Masked", (type(native),), {"__call__": masked})
    try:
        with pytest.raises(NotImplementedError, match=r"attention mask of shape \(1, 1, 256, 256\)"):
            run(model, inputs)
    finally:
        dit_sparse.remove(model)


def test_wan22_two_transformers(wan_pipe):
    low, _ = BUILDERS["wan"]()
    high, _ = BUILDERS["wan"]()
    pipe = wan_pipeline(high, transformer_2=low, boundary_ratio=0.875)
    dit_sparse.apply(pipe, "window", tile=(1, 4, 4), window=(1, 0, 0), block_size=16, min_seq_len=0)
    try:
        generate_latents(pipe)
        rep = dit_sparse.report(pipe)
        steps = (get_tracker(high).state.step, get_tracker(low).state.step)
    finally:
        dit_sparse.remove(pipe)
    assert steps == (0, 1)  # the pipeline's step index, shared by both experts
    assert set(rep.per_layer) == {f"{t}.blocks.{i}.attn1" for t in ("transformer", "transformer_2") for i in (0, 1)}
    assert rep.steps == 2 and rep.cfg_passes == ["cond", "uncond"] and rep.sparse_calls == 8
    assert get_tracker(high) is None and get_tracker(low) is None


def test_set_attn_processor_in_a_pipeline(wan_pipe):
    pipe, _ = wan_pipe
    originals = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor(SparseProcessor("window", tile=(1, 4, 4), window=(1, 0, 0), block_size=16,
                                                        min_seq_len=0))  # fmt: skip
    try:
        generate_latents(pipe)
        rep = dit_sparse.report(pipe)
    finally:
        dit_sparse.remove(pipe)
        pipe.transformer.set_attn_processor(originals)
    # the first call is seen before dit_sparse tracks the transformer: it has no pipeline name (documented)
    assert rep.steps == 2 and rep.sparse_calls == 8 and 0 < rep.density < 1
    assert "uncond" in rep.cfg_passes and "cond" in rep.cfg_passes


def test_dropout_causal_gqa_are_errors():
    from dit_sparse.pipelines import WanAdapter

    proc, q = SparseProcessor("dense"), torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        proc._extras("l", WanAdapter(), q, q, None, 0.1, False, False)
    with pytest.raises(NotImplementedError, match="is_causal=True"):
        proc._extras("l", WanAdapter(), q, q, None, 0.0, True, False)
    with pytest.raises(NotImplementedError, match="grouped-query"):
        proc._extras("l", WanAdapter(), q, q[:, :1], None, 0.0, False, True)
    with pytest.raises(NotImplementedError, match=r"attention mask of shape \(1, 1, 1, 8\)"):  # Wan has no padding mask
        proc._extras("l", WanAdapter(), q, q, torch.ones(1, 1, 1, 8, dtype=torch.bool), 0.0, False, False)
