"""Wan VACE, SkyReels-V2 and Cosmos (tiny random configs, CPU, fp32, odd token grid 3×5×7 = 105 video tokens)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from host_sync import no_host_sync
from tiny_dit import applied, cosmos, run, skyreels_v2, wan_vace
from torch.overrides import TorchFunctionMode

import dit_sparse
from dit_sparse.layout import TokenLayout
from dit_sparse.pipelines import CosmosAdapter, SkyReelsV2Adapter, WanAdapter, WanVACEAdapter, adapter_for
from dit_sparse.processor import SparseProcessor
from dit_sparse.state import get_tracker

BUILDERS = {
    "wan_vace": wan_vace,
    "wan_vace_short_control": functools.partial(wan_vace, control_frames=2),
    "skyreels_v2": skyreels_v2,
    "cosmos": cosmos,
    "cosmos_video2world": functools.partial(cosmos, video2world=True),
    "cosmos_img_context": functools.partial(cosmos, img_context=True),
}
ADAPTER = {"wan_vace": WanVACEAdapter, "skyreels_v2": SkyReelsV2Adapter, "cosmos": CosmosAdapter}
MAIN = {"wan_vace": "blocks", "skyreels_v2": "blocks", "cosmos": "transformer_blocks"}
SPARSE_LAYERS = {
    "wan_vace": {"blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1", "vace_blocks.0.attn1", "vace_blocks.1.attn1"},
    "skyreels_v2": {"blocks.0.attn1", "blocks.1.attn1"},
    "cosmos": {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"},
}
POLICY = {"block_size": 16, "min_seq_len": 0, "dense_steps": 0, "dense_layers": 0}


def _family(name: str) -> str:
    return next(f for f in ADAPTER if name.startswith(f))


def _processors(model) -> dict[str, object]:
    return {n: m.processor for n, m in model.named_modules() if getattr(m, "processor", None) is not None}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def variant(request):
    model, inputs = BUILDERS[request.param]()
    return _family(request.param), model, inputs, run(model, inputs)


def test_adapter_layout_and_modules(variant):
    family, model, inputs, _ = variant
    adapter = adapter_for(model)
    assert type(adapter) is ADAPTER[family]
    assert adapter.layout(model, adapter.bind(model, (), inputs)) == TokenLayout(3, 5, 7, batch=2)
    assert {n for n, _ in adapter.self_attention_modules(model)} == SPARSE_LAYERS[family]
    assert all(n.endswith("attn2") for n, _ in adapter.attention_modules(model) if not adapter.is_self_attention(n))


def test_dense_equals_native_and_remove_is_exact(variant):
    family, model, inputs, ref = variant
    originals = _processors(model)
    with applied(model, "dense", **POLICY):
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    assert (out - ref).abs().max().item() <= 1e-5
    assert set(rep.per_layer) == SPARSE_LAYERS[family]  # every attn2 (cross-attention) stays native
    assert rep.calls == rep.sparse_calls == len(SPARSE_LAYERS[family]) and rep.steps == 1
    assert all(_processors(model)[k] is v for k, v in originals.items()) and get_tracker(model) is None
    assert torch.equal(run(model, inputs), ref)


def test_shared_processor_the_diffusers_way(variant):
    family, model, inputs, ref = variant
    originals = _processors(model)
    proc = SparseProcessor("dense", **POLICY)
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(proc)
    else:  # Cosmos: no AttentionMixin
        for module in model.modules():
            if getattr(module, "processor", None) is not None:
                module.set_processor(proc)
    try:
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
        restored = {k: type(v) for k, v in _processors(model).items()}
        for n, m in model.named_modules():
            if n in originals:
                m.processor = originals[n]
    assert (out - ref).abs().max().item() <= 1e-5  # the adapter's native processors (Cosmos: 2_0, and 2_5)
    assert rep.sparse_calls == rep.calls == len(SPARSE_LAYERS[family])
    assert restored == {k: type(v) for k, v in originals.items()}


@pytest.mark.parametrize(
    ("method", "params"), [("radial", {"decay": 0.5, "min_window": 4}), ("draft", {"pool": (4, 4), "sparsity": 0.5})]
)
def test_static_and_dynamic_methods_run_sparse(variant, method, params):
    family, model, inputs, ref = variant
    with applied(model, method, error_sample=1, **POLICY, **params):
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rep.sparse_calls == rep.calls == len(SPARSE_LAYERS[family]) and 0 < rep.density < 1
    assert 0 < rep.attn_error["out_rel_l2"] < 1
    assert all(0 < row["density"] < 1 for row in rep.per_layer.values())


# ---------------------------------------------------------------------------------------------------- Wan VACE


def test_vace_control_stream_matters_and_is_sparse_at_the_video_length(monkeypatch):
    model, inputs = wan_vace()
    ref = run(model, inputs)
    no_control = run(model, {**inputs, "control_hidden_states": torch.zeros_like(inputs["control_hidden_states"])})
    unscaled = run(model, {**inputs, "control_hidden_states_scale": torch.zeros(2)})
    assert (ref - no_control).abs().max() > 1e-4 and (ref - unscaled).abs().max() > 1e-4
    seen = []
    original = SparseProcessor._sparse

    def spy(self, q, k, v, layout, ctx, *args):
        seen.append((ctx.layer, q.shape[-2], layout.grid))
        return original(self, q, k, v, layout, ctx, *args)

    monkeypatch.setattr(SparseProcessor, "_sparse", spy)
    with applied(model, "radial", decay=0.5, min_window=4, **POLICY):
        run(model, inputs)
    vace = [(n, grid) for layer, n, grid in seen if layer.startswith("vace_blocks")]
    assert vace == [(105, (3, 5, 7))] * 2  # the control stream has the video's token grid
    assert [layer for layer, *_ in seen][:2] == ["vace_blocks.0.attn1", "vace_blocks.1.attn1"]  # they run first


# ---------------------------------------------------------------------------------------------------- SkyReels-V2


def _df_timesteps(steps: int, frames: int, ar_step: int) -> list[torch.Tensor]:
    """The per-frame timesteps of each iteration of the diffusion-forcing pipeline (its own step matrix)."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing import (
        SkyReelsV2DiffusionForcingPipeline,
    )

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    scheduler.set_timesteps(steps)
    matrix, *_ = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(
        None, frames, scheduler.timesteps, frames, ar_step, 0, 1
    )
    return list(matrix)


def test_skyreels_per_frame_timestep_is_read_without_sync():
    model, inputs = skyreels_v2()
    adapter = adapter_for(model)
    with no_host_sync():
        t = adapter.timestep(adapter.bind(model, (), inputs))
    assert t.shape == (2,) and torch.allclose(t, torch.full((2,), (800 + 900 + 999) / 3))
    flat = {**inputs, "timestep": torch.full((2,), 700.0), "enable_diffusion_forcing": False}
    assert torch.equal(adapter.timestep(adapter.bind(model, (), flat)), flat["timestep"])


def test_skyreels_diffusion_forcing_pipeline_counts_one_step_per_iteration():
    """Asynchronous diffusion forcing (``ar_step=2``): frames not started yet stay at 999, so the largest timestep
    repeats over the first iterations; each iteration must still be one step of one generation (the dense warm-up
    counts them)."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

    model, _ = skyreels_v2()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=scheduler
    )
    rows = _df_timesteps(steps=4, frames=3, ar_step=2)  # what the pipeline below runs: 3 latent frames
    assert len(rows) == 8 and float(rows[0].max()) == float(rows[1].max())  # the case the mean is for
    g = torch.Generator().manual_seed(0)
    with applied(pipe, "radial", decay=0.5, min_window=4, **{**POLICY, "dense_steps": 2}):
        pipe(
            prompt=None, prompt_embeds=torch.randn(1, 16, 32, generator=g),
            negative_prompt_embeds=torch.randn(1, 16, 32, generator=g), height=80, width=112, num_frames=9,
            num_inference_steps=4, guidance_scale=6.0, ar_step=2, output_type="latent", generator=g,
        )  # fmt: skip
        rep = dit_sparse.report(pipe)
    assert rep.generations == 1 and rep.steps == len(rows) and rep.cfg_passes == ["cond", "uncond"]
    assert rep.num_steps == 4  # the schedule's steps; the iterations outnumber them
    assert rep.dense_calls == 2 * 2 * 2  # 2 warm-up iterations x 2 passes x 2 layers
    assert rep.sparse_calls == (len(rows) - 2) * 2 * 2


class _MaskSpy(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


def test_skyreels_causal_mask_reaches_sdpa_and_is_refused_not_dropped(monkeypatch):
    model, inputs = skyreels_v2()
    model._set_ar_attention(3)  # num_frame_per_block = 3: one causal block of the 3 latent frames
    with _MaskSpy() as spy:
        run(model, inputs)
    self_masks = spy.masks[::2]  # attn1, attn2 per block
    assert all(m is not None and m.dtype == torch.bool and m.shape == (1, 1, 105, 105) for m in self_masks)
    with applied(model, "dense", **POLICY), pytest.raises(NotImplementedError, match="block-causal"):
        run(model, inputs)
    # past the adapter's check, the processor itself refuses the mask (it never drops it)
    adapter = adapter_for(model)
    monkeypatch.setattr(adapter, "layout", functools.partial(WanAdapter.layout, adapter))
    with applied(model, "dense", **POLICY), pytest.raises(NotImplementedError, match=r"attention mask of shape"):
        run(model, inputs)
    assert get_tracker(model) is None


# ---------------------------------------------------------------------------------------------------- Cosmos


def test_cosmos_text_mask_stays_with_the_native_cross_attention():
    model, inputs = cosmos()
    with _MaskSpy() as spy:
        ref = run(model, inputs)
    assert spy.masks[0::2] == [None, None]  # the forward gives attn1 no mask
    assert all(m.dtype == torch.bool and m.shape == (2, 1, 1, 12) for m in spy.masks[1::2])  # attn2's text mask
    unmasked = run(model, {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])})
    assert (ref - unmasked).abs().max() > 1e-4  # the padded text is masked in attn2
    with applied(model, "dense", **POLICY):
        out = run(model, inputs)
        rep = dit_sparse.report(model)
    assert rep.sparse_calls == 2 and (out - ref).abs().max().item() <= 1e-5  # attn2 got its mask


def test_cosmos_video2world_timestep_reads_the_noisy_frames():
    model, inputs = cosmos(video2world=True)
    assert inputs["timestep"].shape == (2, 1, 3, 1, 1)
    with applied(model, "dense", **POLICY):
        run(model, inputs)
        frame = get_tracker(model).frame
    assert frame.timestep == pytest.approx(0.5) and frame.layout == TokenLayout(3, 5, 7, batch=2)


def test_cosmos_native_processors():
    from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0, CosmosAttnProcessor2_5

    plain, _ = cosmos()
    image, _ = cosmos(img_context=True)
    adapter = CosmosAdapter()
    for model, cross in ((plain, CosmosAttnProcessor2_0), (image, CosmosAttnProcessor2_5)):
        block = model.transformer_blocks[0]
        assert type(adapter.native_processor("transformer_blocks.0.attn1", block.attn1)) is CosmosAttnProcessor2_0
        assert type(adapter.native_processor("transformer_blocks.0.attn2", block.attn2)) is cross
        assert type(block.attn2.processor) is cross  # what the model itself installs
