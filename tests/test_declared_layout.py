"""``dit_sparse.apply(model, method, layout=...)``: any transformer whose self-attention calls F.sdpa (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import dit_sparse
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import get_method
from dit_sparse.state import SITE_ATTR, StepContext, get_tracker

GRID = (3, 5, 7)  # odd in every axis: 105 video tokens, tails in every block
TEXT = 6
STATIC = {"min_seq_len": 0, "dense_steps": 0, "dense_layers": 0}


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.q, self.kv, self.out = heads, nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.cross = nn.LayerNorm(dim), CrossAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, text_prefix: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        video = x[:, text_prefix:]
        video = video + self.cross(self.norm2(video), context)
        return torch.cat([x[:, :text_prefix], video + self.mlp(video)], dim=1)


class PlainVideoTransformer(nn.Module):
    """Not a Diffusers model: latent (B, C, T, H, W) -> one token per latent pixel, self-attention (optionally over
    ``[text, video]``), cross-attention to the text, a timestep embedding."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, depth: int = 2, joint_text: bool = False):
        super().__init__()
        self.joint_text = joint_text
        self.inp, self.outp = nn.Linear(channels, dim), nn.Linear(dim, channels)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor, **extra) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.inp(x.flatten(2).transpose(1, 2)) + self.time(timestep.view(b, 1, 1).float() / 1000)
        prefix = context.shape[1] if self.joint_text else 0
        if prefix:
            tokens = torch.cat([context, tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens, context, prefix)
        return self.outp(tokens[:, prefix:]).transpose(1, 2).reshape(b, c, t, h, w)


def _model(joint_text: bool = False) -> PlainVideoTransformer:
    torch.manual_seed(0)
    return PlainVideoTransformer(joint_text=joint_text).eval()


def _inputs(batch: int = 2, grid: tuple[int, int, int] = GRID, t: float = 500.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(batch, 4, *grid, generator=g),
        "context": torch.randn(batch, TEXT, 32, generator=g),
        "timestep": torch.full((batch,), t),
    }


def _layout(joint_text: bool = False, grid: tuple[int, int, int] = GRID) -> TokenLayout:
    return TokenLayout(*grid, text_len=TEXT, text_where="prefix") if joint_text else TokenLayout(*grid)


def _run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


def _state(model: nn.Module) -> list:
    """Everything dit_sparse could leave on the model's modules (hooks, sites, attributes)."""
    return [
        (n, dict(m._forward_hooks), dict(m._forward_pre_hooks), SITE_ATTR in m.__dict__, hasattr(m, "processor"))
        for n, m in model.named_modules()
    ]


@pytest.mark.parametrize("joint_text", [False, True])
def test_dense_equals_model_and_remove_is_exact(joint_text):
    model, inputs = _model(joint_text), _inputs()
    ref, before = _run(model, inputs), _state(model)
    dit_sparse.apply(model, "dense", layout=_layout(joint_text), block_size=16, min_seq_len=0)
    try:
        first, second = _run(model, inputs), _run(model, _inputs(t=400.0))  # discovery forward, then hooks
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert (first - ref).abs().max().item() <= 1e-5
    assert (second - _run(model, _inputs(t=400.0))).abs().max().item() <= 1e-5
    assert set(rep.per_layer) == {"blocks.0.attn", "blocks.1.attn"}  # not the blocks, not the cross-attention
    assert rep.calls == rep.sparse_calls == 4 and rep.steps == 2 and rep.density == pytest.approx(1.0)
    assert get_tracker(model) is None and _state(model) == before
    assert torch.equal(_run(model, inputs), ref)


def _masked_reference(model: nn.Module, inputs: dict, masks: list[torch.Tensor]) -> torch.Tensor:
    """The model with its self-attention SDPA calls given the plans' dense masks (layer order): torch's own SDPA."""
    n = _layout().seq_len
    calls = iter(masks)

    class Masked(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention and args[0].shape[-2] == args[1].shape[-2] == n:
                return func(*args, attn_mask=next(calls), **kwargs)
            return func(*args, **kwargs)

    with Masked():
        return _run(model, inputs)


@pytest.mark.parametrize(
    ("method", "params"),
    [("window", {"tile": (1, 4, 4), "window": (0, 1, 0)}), ("radial", {"decay": 0.5, "min_window": 4})],
)
def test_static_methods_equal_torch_reference_on_their_plan(method, params):
    model, inputs = _model(), _inputs()
    layout = TokenLayout(*GRID, batch=2)
    planner = get_method(method, block_size=16, **STATIC, **params)
    q = torch.zeros(2, 2, layout.seq_len, 16)
    masks = [
        planner.get_plan(q, q, layout, StepContext(0, 500.0, "pass0", f"blocks.{i}.attn", i, layout)).to_dense_mask()
        for i in range(2)
    ]
    assert all(not m.all() for m in masks)  # really sparse
    ref = _masked_reference(model, inputs, masks)
    dit_sparse.apply(model, method, layout=TokenLayout(*GRID), block_size=16, **STATIC, **params)
    try:
        out = _run(model, inputs)
        again = _run(model, inputs)  # the hook path gives the same
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, again)
    assert rep.sparse_calls == rep.calls == 4 and 0 < rep.density < 1


def test_dynamic_method_runs():
    model = _model()
    dit_sparse.apply(
        model, "draft", layout=TokenLayout(*GRID), pool=(4, 4), block_size=16, sparsity=0.5, **STATIC
    )  # fmt: skip
    try:
        outs = [_run(model, _inputs(t=t)) for t in (900.0, 800.0, 700.0)]
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert all(torch.isfinite(o).all() for o in outs)
    assert rep.method == "draft" and rep.steps == 3 and rep.sparse_calls == rep.calls == 6 and 0 < rep.density < 1


def test_layout_function_of_the_forward_inputs():
    model = _model(joint_text=True)
    seen: list[set[str]] = []

    def layout(inputs: dict) -> TokenLayout:
        seen.append(set(inputs))
        _, _, t, h, w = inputs["x"].shape
        return TokenLayout(t, h, w, text_len=inputs["context"].shape[1], text_where="prefix")

    small = {**_inputs(grid=(2, 3, 5)), "note": "extra keyword"}
    refs = [_run(model, _inputs()), _run(model, small)]
    dit_sparse.apply(model, "dense", layout=layout, block_size=16, min_seq_len=0)
    try:
        outs = [_run(model, _inputs()), _run(model, small)]  # another grid: the function's layout follows it
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert all((o - r).abs().max().item() <= 1e-5 for o, r in zip(outs, refs, strict=True))
    assert seen == [{"x", "context", "timestep"}, {"x", "context", "timestep", "note"}]
    assert rep.sparse_calls == 4 and rep.generations == 2  # a new grid starts a new generation


def test_attention_regex_names_the_modules():
    model, inputs = _model(), _inputs()
    ref = _run(model, inputs)
    dit_sparse.apply(model, "dense", layout=TokenLayout(*GRID), attention=r"blocks\.1\.attn", min_seq_len=0)
    try:
        out = _run(model, inputs)
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert (out - ref).abs().max().item() <= 1e-5 and list(rep.per_layer) == ["blocks.1.attn"]
    # a block and its attention both matched: the innermost is the self-attention module
    dit_sparse.apply(model, "dense", layout=TokenLayout(*GRID), attention=r"blocks\.\d+(\.attn)?", min_seq_len=0)
    try:
        _run(model, inputs)
        assert set(dit_sparse.report(model).per_layer) == {"blocks.0.attn", "blocks.1.attn"}
    finally:
        dit_sparse.remove(model)


def test_diffusers_model_of_another_class_with_a_declared_layout():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=14, patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 4, 14, 14, generator=g),
        "timestep": torch.tensor([500, 500]),
        "class_labels": torch.tensor([1, 2]),
        "return_dict": False,
    }
    ref = _run(model, inputs)[0]
    with pytest.raises(TypeError, match=r"does not support DiTTransformer2DModel.*layout="):
        dit_sparse.apply(model, "dense")

    def layout(inputs: dict) -> TokenLayout:
        h, w = inputs["hidden_states"].shape[-2:]
        return TokenLayout(1, h // 2, w // 2)  # 7 x 7 patches

    dit_sparse.apply(model, "window", layout=layout, tile=(1, 4, 4), window=(0, 0, 0), block_size=16, **STATIC)
    try:
        out = _run(model, inputs)[0]
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert set(rep.per_layer) == {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}
    assert rep.sparse_calls == 2 and 0 < rep.density < 1 and out.shape == ref.shape
    assert torch.equal(_run(model, inputs)[0], ref)


# ---------------------------------------------------------------------------------------------- errors
def test_error_no_layout_for_a_plain_model():
    model = _model()
    with pytest.raises(TypeError, match=r"does not support PlainVideoTransformer.*layout=TokenLayout"):
        dit_sparse.apply(model, "dense")
    with pytest.raises(ValueError, match=r"attention= .* give layout="):
        dit_sparse.apply(model, "dense", attention=r"blocks\.\d+\.attn")
    with pytest.raises(TypeError, match=r"layout= takes a TokenLayout or a function"):
        dit_sparse.apply(model, "dense", layout=(3, 5, 7))
    assert get_tracker(model) is None


def test_error_layout_function_returns_no_layout():
    model = _model()
    dit_sparse.apply(model, "dense", layout=lambda inputs: None)
    try:
        with pytest.raises(TypeError, match=r"no token layout .* returned None; it must return a TokenLayout"):
            _run(model, _inputs())
    finally:
        dit_sparse.remove(model)


def test_error_no_self_attention_module_found():
    model, inputs = _model(), _inputs()
    ref = _run(model, inputs)
    dit_sparse.apply(model, "dense", layout=TokenLayout(3, 5, 8))  # 120 tokens, the model attends 105
    try:
        with pytest.raises(RuntimeError, match=r"found no self-attention module .* 120 tokens .* 105x6, 105x105"):
            _run(model, inputs)
    finally:
        dit_sparse.remove(model)
    assert torch.equal(_run(model, inputs), ref)


def test_error_layout_does_not_match_the_calls_tokens():
    model = _model()
    dit_sparse.apply(model, "dense", layout=TokenLayout(3, 5, 8), attention=r"blocks\.\d+\.attn", min_seq_len=0)
    try:
        with pytest.raises(RuntimeError, match=r"'blocks.0.attn' attends 105 tokens .* 120 video tokens .* layout="):
            _run(model, _inputs())
    finally:
        dit_sparse.remove(model)


def test_error_named_module_makes_no_sdpa_call():
    model = _model()
    with pytest.raises(ValueError, match=r"attention=.*ffn.* matches no module name of this PlainVideoTransformer"):
        dit_sparse.apply(model, "dense", layout=TokenLayout(*GRID), attention=r"blocks\.\d+\.ffn")
    dit_sparse.apply(model, "dense", layout=TokenLayout(*GRID), attention=r"blocks\.\d+\.mlp")
    try:
        with pytest.raises(RuntimeError, match=r"'blocks.0.mlp' \(Sequential\) made no .*scaled_dot_product_attention"):
            _run(model, _inputs())
    finally:
        dit_sparse.remove(model)
    assert _state(model) == _state(_model())
