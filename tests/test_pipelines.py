"""Adapters and the processor on the five supported families (tiny random models, CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from tiny_dit import BUILDERS, FAMILIES, run

import dit_sparse
from dit_sparse.layout import TokenLayout
from dit_sparse.pipelines import adapter_for, supported_models
from dit_sparse.processor import SparseProcessor
from dit_sparse.state import get_tracker

EXPECTED_LAYOUT = {
    "wan": TokenLayout(4, 8, 8, batch=1),
    "cogvideox": TokenLayout(2, 8, 8, text_len=16, text_where="prefix", batch=2),
    "hunyuan_video": TokenLayout(4, 8, 8, text_len=12, text_where="suffix", batch=2),
    "ltx": TokenLayout(4, 8, 8, batch=2),
    "mochi": TokenLayout(4, 8, 8, text_len=16, text_where="suffix", batch=2),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, inputs = BUILDERS[request.param]()
    return request.param, model, inputs, run(model, inputs)


def _processors(model) -> dict[str, object]:
    return {n: m.processor for n, m in model.named_modules() if getattr(m, "processor", None) is not None}


def test_adapter_layout(family):
    name, model, inputs, _ = family
    adapter = adapter_for(model)
    assert adapter.layout(model, adapter.bind(model, (), inputs)) == EXPECTED_LAYOUT[name]
    assert adapter.self_attention_modules(model)


def test_apply_dense_equals_model_and_remove_is_exact(family):
    name, model, inputs, ref = family
    originals = _processors(model)
    dit_sparse.apply(model, "dense", min_seq_len=0, block_size=32)
    try:
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert (out - ref).abs().max().item() <= 1e-5
    layers = len(adapter_for(model).self_attention_modules(model))
    per_forward = layers * (inputs["hidden_states"].shape[0] if name == "mochi" else 1)  # Mochi loops over the batch
    assert rep.calls == rep.sparse_calls == per_forward and rep.dense_calls == 0
    assert rep.density == pytest.approx(1.0) and rep.method == "dense" and rep.params["block_size"] == 32
    assert rep.steps == 1 and len(rep.transformer_ms) == 1 and rep.attention_ms > 0
    assert _processors(model) == originals and all(_processors(model)[k] is v for k, v in originals.items())
    assert get_tracker(model) is None
    assert torch.equal(run(model, inputs), ref)


def test_shared_processor_the_diffusers_way(family):
    name, model, inputs, ref = family
    originals = _processors(model)
    proc = SparseProcessor("dense", block_size=32)
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(proc)
    else:  # Mochi: no AttentionMixin
        for module in model.modules():
            if getattr(module, "processor", None) is not None:
                module.processor = proc
    try:
        out = run(model, inputs)
        out_again = run(model, inputs)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(out, out_again)
    assert rep.sparse_calls == rep.calls > 0 and rep.steps == 1
    # native processors are back (fresh instances of the model's own classes); output bit-identical
    assert {k: type(v) for k, v in _processors(model).items()} == {k: type(v) for k, v in originals.items()}
    assert torch.equal(run(model, inputs), ref)
    # put the originals back for the next tests of this module-scoped model
    for n, m in model.named_modules():
        if n in originals:
            m.processor = originals[n]


def test_window_runs_sparse_with_several_blocks(family):
    name, model, inputs, ref = family
    dit_sparse.apply(model, "window", tile=(1, 4, 4), window=(1, 0, 0), block_size=16, min_seq_len=0, error_sample=1)
    try:
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rep.sparse_calls == rep.calls > 0
    assert 0.0 < rep.density < 1.0
    assert set(rep.attn_error) == {"out_rel_l2", "lse_rel_l2"} and rep.attn_error["out_rel_l2"] > 0
    assert all("out_rel_l2" in row for row in rep.per_layer.values())


def test_hunyuan_padded_text_is_masked():
    model, inputs = BUILDERS["hunyuan_video"]()
    padded = run(model, inputs)
    unpadded = run(model, {**inputs, "encoder_attention_mask": torch.ones_like(inputs["encoder_attention_mask"])})
    assert (padded - unpadded).abs().max() > 1e-3  # the padding matters, so kv_len must be honoured
    dit_sparse.apply(model, "dense", block_size=32, error_sample=1)
    try:
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert (out - padded).abs().max().item() <= 1e-5
    assert rep.attn_error["out_rel_l2"] < 1e-5 and rep.attn_error["lse_rel_l2"] < 1e-5


def test_cogvideox_pipeline_batched_cfg():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    model, _ = BUILDERS["cogvideox"]()
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=CogVideoXDDIMScheduler()
    )
    dit_sparse.apply(pipe, "window", tile=(1, 4, 4), window=(0, 1, 1), block_size=16, min_seq_len=0)
    g = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, 16, 32, generator=g), "negative_prompt_embeds": torch.randn(1, 16, 32)}
    try:
        pipe(**embeds, height=128, width=128, num_frames=13, num_inference_steps=2, guidance_scale=6.0,
             output_type="latent")  # fmt: skip
        rep = dit_sparse.report(pipe)
        state = get_tracker(model).state
        assert state.shape_key.batch == 2  # unconditional and conditional halves in one call
    finally:
        dit_sparse.remove(pipe)
    assert rep.cfg_passes == ["cond_uncond"] and rep.steps == 2 and len(rep.transformer_ms) == 2
    assert rep.sparse_calls == 2 * 2 and 0 < rep.density < 1


def test_supported_models_listed():
    assert supported_models() == [
        "CogVideoXTransformer3DModel",
        "CosmosTransformer3DModel",
        "HunyuanVideo15Transformer3DModel",
        "HunyuanVideoTransformer3DModel",
        "Kandinsky5Transformer3DModel",
        "LTX2VideoTransformer3DModel",
        "LTXVideoTransformer3DModel",
        "MochiTransformer3DModel",
        "SkyReelsV2Transformer3DModel",
        "WanTransformer3DModel",
        "WanVACETransformer3DModel",
    ]
