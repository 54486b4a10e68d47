"""The newer models on the existing adapters: Wan 2.2 TI2V-5B, Wan 2.2 A14B (two experts), Wan 2.1 / 2.2 I2V
(tiny random configs, CPU, fp32, odd token grids)."""

from __future__ import annotations

import pytest
import torch
from tiny_dit import applied, run, wan, wan_i2v, wan_pipeline, wan_ti2v

import dit_sparse
from dit_sparse.state import get_tracker

BUILDERS = {"wan_ti2v": wan_ti2v, "wan_i2v": wan_i2v}
POLICY = {"block_size": 16, "min_seq_len": 0, "dense_steps": 0, "dense_layers": 0}


def _processors(model) -> dict[str, object]:
    return {n: m.processor for n, m in model.named_modules() if getattr(m, "processor", None) is not None}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    model, inputs = BUILDERS[request.param]()
    return request.param, model, inputs, run(model, inputs)


def test_dense_equals_native_and_remove_is_exact(family):
    name, model, inputs, ref = family
    originals = _processors(model)
    with applied(model, "dense", **POLICY):
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    assert (out - ref).abs().max().item() <= 1e-5
    assert set(rep.per_layer) == {"blocks.0.attn1", "blocks.1.attn1"}  # attn2 (text, image tokens) stays native
    assert rep.calls == rep.sparse_calls == 2
    assert all(_processors(model)[k] is v for k, v in originals.items()) and get_tracker(model) is None
    assert torch.equal(run(model, inputs), ref)


@pytest.mark.parametrize(
    ("method", "params"), [("radial", {"decay": 0.5, "min_window": 4}), ("draft", {"pool": (4, 4), "sparsity": 0.5})]
)
def test_static_and_dynamic_methods_run_sparse(family, method, params):
    name, model, inputs, ref = family
    with applied(model, method, error_sample=1, **POLICY, **params):
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rep.sparse_calls == rep.calls == 2 and 0 < rep.density < 1
    assert 0 < rep.attn_error["out_rel_l2"] < 1


def test_i2v_image_tokens_go_through_cross_attention():
    model, inputs = wan_i2v()
    without_image = {**inputs, "encoder_hidden_states_image": torch.zeros_like(inputs["encoder_hidden_states_image"])}
    assert (run(model, inputs) - run(model, without_image)).abs().max() > 1e-4  # the image tokens matter
    assert model.blocks[0].attn2.add_k_proj is not None  # added key/values of the cross-attention


def test_a14b_two_experts_both_sparse_and_dense_equals_native():
    from tiny_dit import generate_latents

    high, _ = wan()
    torch.manual_seed(1)
    low, _ = wan()
    for p in low.parameters():  # another expert: other weights
        p.data.add_(0.01 * torch.randn_like(p))
    pipe = wan_pipeline(high, transformer_2=low, boundary_ratio=0.9)
    ref = generate_latents(pipe, steps=3)
    with applied(pipe, "dense", **POLICY):
        out = generate_latents(pipe, steps=3)
        rep = dit_sparse.report(pipe)
    assert (out - ref).abs().max().item() <= 1e-5
    assert {name.split(".")[0] for name in rep.per_layer} == {"transformer", "transformer_2"}  # both experts
    assert all(row["sparse_calls"] > 0 for row in rep.per_layer.values())
    assert torch.equal(generate_latents(pipe, steps=3), ref)
    with applied(pipe, "radial", decay=0.5, min_window=4, **POLICY):
        generate_latents(pipe, steps=3)
        rep = dit_sparse.report(pipe)
    assert {name.split(".")[0] for name in rep.per_layer} == {"transformer", "transformer_2"}
    assert 0 < rep.density < 1
