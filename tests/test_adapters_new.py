"""Adapters of HunyuanVideo 1.5, LTX-2 and Kandinsky 5 (tiny random configs, CPU, fp32, odd token grids): dense
equals the model's own processors, remove is bit-exact, a static (radial) and a dynamic (draft) method run sparse."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_dit import applied, hunyuan_video15, kandinsky5, ltx2, run

import dit_sparse
from dit_sparse.layout import TokenLayout
from dit_sparse.pipelines import adapter_for
from dit_sparse.processor import SparseProcessor
from dit_sparse.state import get_tracker

BUILDERS = {
    "hunyuan_video15_t2v": hunyuan_video15,
    "hunyuan_video15_i2v": functools.partial(hunyuan_video15, image=True),
    "ltx2": ltx2,
    "kandinsky5": kandinsky5,
}
SELF_ATTENTION = {
    "hunyuan_video15_t2v": {"transformer_blocks.0.attn", "transformer_blocks.1.attn"},
    "hunyuan_video15_i2v": {"transformer_blocks.0.attn", "transformer_blocks.1.attn"},
    "ltx2": {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"},
    "kandinsky5": {"visual_transformer_blocks.0.self_attention", "visual_transformer_blocks.1.self_attention"},
}
EXPECTED_LAYOUT = {
    "hunyuan_video15_t2v": TokenLayout(3, 5, 7, text_len=5 + 6 + 12, text_where="suffix", batch=2),
    "hunyuan_video15_i2v": TokenLayout(3, 5, 7, text_len=5 + 6 + 12, text_where="suffix", batch=2),
    "ltx2": TokenLayout(3, 5, 7, batch=2),
    "kandinsky5": TokenLayout(3, 5, 7, batch=2),
}
POLICY = {"block_size": 16, "min_seq_len": 0, "dense_steps": 0, "dense_layers": 0}
RADIAL = {"decay": 0.2, "min_window": 2, "sink": False}  # sparse on 3 frames (the sink would make them dense)


def _processors(model) -> dict[str, object]:
    return {n: m.processor for n, m in model.named_modules() if getattr(m, "processor", None) is not None}


def _outputs(model, inputs) -> tuple[torch.Tensor, ...]:
    """Every output of the forward (LTX-2: video and audio)."""
    with torch.no_grad():
        out = model(**inputs)
    return tuple(out) if isinstance(out, tuple) else (out[0],)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    model, inputs = BUILDERS[request.param]()
    return request.param, model, inputs, _outputs(model, inputs)


def test_layout_and_self_attention_modules(family):
    name, model, inputs, _ = family
    adapter = adapter_for(model)
    assert adapter.layout(model, adapter.bind(model, (), inputs)) == EXPECTED_LAYOUT[name]
    assert {n for n, _ in adapter.self_attention_modules(model)} == SELF_ATTENTION[name]


def test_dense_equals_native_and_remove_is_exact(family):
    name, model, inputs, ref = family
    originals = _processors(model)
    with applied(model, "dense", **POLICY):
        out = _outputs(model, inputs)
        rep = dit_sparse.report(model)
    assert all((o - r).abs().max().item() <= 1e-5 for o, r in zip(out, ref, strict=True))
    assert set(rep.per_layer) == SELF_ATTENTION[name]  # everything else stays native
    assert rep.calls == rep.sparse_calls == 2 and rep.density == pytest.approx(1.0)
    assert all(_processors(model)[k] is v for k, v in originals.items()) and get_tracker(model) is None
    assert all(torch.equal(o, r) for o, r in zip(_outputs(model, inputs), ref, strict=True))


@pytest.mark.parametrize(("method", "params"), [("radial", RADIAL), ("draft", {"pool": (4, 4), "sparsity": 0.5})])
def test_static_and_dynamic_methods_run_sparse(family, method, params):
    name, model, inputs, ref = family
    with applied(model, method, error_sample=1, **POLICY, **params):
        out = _outputs(model, inputs)
        rep = dit_sparse.report(model)
    assert all(o.shape == r.shape and torch.isfinite(o).all() for o, r in zip(out, ref, strict=True))
    assert rep.sparse_calls == rep.calls == 2 and 0 < rep.density < 1
    assert 0 < rep.attn_error["out_rel_l2"] < 1


def test_the_diffusers_way_runs_dense_on_the_pairwise_masks_key_row():
    model, inputs = hunyuan_video15()
    ref = run(model, inputs)
    originals = _processors(model)
    proc = SparseProcessor("dense", block_size=16, min_seq_len=0)
    model.set_attn_processor(proc)
    try:
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert (out - ref).abs().max().item() <= 1e-5 and rep.sparse_calls == rep.calls == 2
    assert {k: type(v) for k, v in _processors(model).items()} == {k: type(v) for k, v in originals.items()}
    assert torch.equal(run(model, inputs), ref)


def test_the_diffusers_way_removed_before_any_forward_gives_the_natives_back():
    model, inputs = hunyuan_video15()
    ref = run(model, inputs)
    originals = {k: type(v) for k, v in _processors(model).items()}
    model.set_attn_processor(SparseProcessor("dense"))
    dit_sparse.remove(model)
    assert {k: type(v) for k, v in _processors(model).items()} == originals
    assert torch.equal(run(model, inputs), ref)


def test_hunyuan_video15_padded_conditions_are_masked():
    model, inputs = hunyuan_video15()
    ref = run(model, inputs)
    noisy = dict(inputs)  # other values at the padded Qwen positions (the forward zeroes the padded ByT5 ones)
    noisy["encoder_hidden_states"] = torch.where(
        inputs["encoder_attention_mask"][..., None].bool(), inputs["encoder_hidden_states"], 7.0
    )
    unmasked = {**inputs, "encoder_attention_mask": torch.ones_like(inputs["encoder_attention_mask"])}
    assert (run(model, unmasked) - ref).abs().max() > 1e-3  # the padding matters, so kv_len must be honoured
    with applied(model, "radial", **RADIAL, **POLICY):
        sparse = run(model, inputs)
        sparse_noisy = run(model, noisy)
    assert (sparse - sparse_noisy).abs().max().item() <= 1e-5  # padded keys are never attended
    assert (sparse - ref).abs().max() > 0


def test_ltx2_needs_the_latent_sizes():
    model, inputs = ltx2()
    with applied(model, "dense", **POLICY), pytest.raises(ValueError, match="needs num_frames"):
        run(model, {**inputs, "num_frames": None})


def test_ltx2_video_self_attention_mask_is_refused_clearly():
    model, inputs = ltx2()
    mask = torch.ones(2, 3 * 5 * 7, 3 * 5 * 7)  # IC-LoRA's multiplicative mask, an additive float one in attn1
    with applied(model, "dense", **POLICY), pytest.raises(NotImplementedError, match="attention mask of shape"):
        run(model, {**inputs, "video_self_attention_mask": mask})


def test_kandinsky5_refuses_its_own_sparse_mode():
    model, inputs = kandinsky5()
    with applied(model, "dense", **POLICY), pytest.raises(ValueError, match="NABLA"):
        run(model, {**inputs, "sparse_params": {"to_fractal": True}})


# the bench entries of these families (and Wan 2.2 TI2V-5B) at tiny sizes: make_inputs drives a forward
TINY_BENCH = {
    "wan2.2-ti2v-5b": (
        dict(num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
        (9, 96, 160),  # latent 3 x 6 x 10 (VAE 16x) -> 3 x 3 x 5 = 45 tokens
        45,
    ),
    "hunyuanvideo1.5": (
        dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(4, 6, 6),
        ),
        (9, 80, 112),  # latent 3 x 5 x 7 = 105 video tokens + 729 + 256 + 1000 condition tokens
        105 + 729 + 256 + 1000,
    ),
    "ltx2": (
        dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
            audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
            audio_cross_attention_dim=8, num_layers=2, caption_channels=16, rope_double_precision=False,
        ),
        (17, 96, 160),  # latent 3 x 3 x 5 = 45 video tokens, 18 audio tokens
        45,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TINY_BENCH))
def test_bench_inputs_drive_a_tiny_model(name):
    import dataclasses

    from dit_sparse import bench

    overrides, shape, tokens = TINY_BENCH[name]
    spec = bench.MODELS[name]
    spec = dataclasses.replace(spec, config={**spec.config, **overrides}, subset={}, quick_subset={})
    model = bench.build_model(spec, torch.device("cpu"), torch.float32)
    inputs, n = spec.make_inputs(model, shape, torch.device("cpu"), torch.float32)
    adapter = adapter_for(model)
    assert n == tokens == adapter.layout(model, adapter.bind(model, (), inputs)).seq_len
    ref = _outputs(model, inputs)
    with applied(model, "dense", **POLICY):  # a self-attention call of another length would raise
        out = _outputs(model, inputs)
        rep = dit_sparse.report(model)
    assert rep.calls == rep.sparse_calls == 2
    assert all((o - r).abs().max().item() <= 1e-5 for o, r in zip(out, ref, strict=True))


@pytest.mark.parametrize("name", ["hunyuan_video15_t2v", "ltx2", "kandinsky5"])
def test_regional_compile_fullgraph_matches_eager(name):
    """compile_repeated_blocks(fullgraph=True) with radial: the eager outputs, and a second forward compiles nothing
    (HunyuanVideo 1.5: the key-mask processor's mode is traced too)."""
    model, inputs = BUILDERS[name]()
    model.requires_grad_(False)
    with applied(model, "radial", **RADIAL, **POLICY):
        eager = _outputs(model, inputs)
    with applied(model, "radial", **RADIAL, **POLICY):
        model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
        first = _outputs(model, inputs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = _outputs(model, inputs)
        rep = dit_sparse.report(model)
    assert rep.sparse_calls == rep.calls == 4 and 0 < rep.density < 1
    for a, b, c in zip(eager, first, again, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
