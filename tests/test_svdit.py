"""Sparse-vDiT: mode geometry, head grouping (≤ 2 launches per layer), kernels on its plans, config files."""

from __future__ import annotations

import json

import pytest
import torch

from dit_sparse.kernels import block_sparse_attention
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import get_method
from dit_sparse.methods.svdit import (
    MODES,
    SvditConfigError,
    build_group_plan,
    group_heads,
    load_config,
    mode_block_mask,
    save_config,
    spatial_major_permutation,
)
from dit_sparse.plan import HEAD_DENSE, HEAD_SKIP
from dit_sparse.state import StepContext, get_tracker

T, H, W = 6, 3, 4  # P = 12 tokens per frame, 72 video tokens
P = H * W


def _token_mask(mode: str, layout: TokenLayout, block: int = 4, **geo) -> torch.Tensor:
    return build_group_plan([mode], layout, block, **geo).to_dense_mask()[0, 0]


def _video(layout: TokenLayout) -> slice:
    return slice(layout.video_start, layout.video_start + layout.video_len)


def test_diagonal_is_a_band_around_the_main_diagonal():
    layout = TokenLayout(T, H, W)
    mask = _token_mask("diagonal", layout, diag_window=0.5)  # ±6 tokens
    idx = torch.arange(layout.seq_len)
    dist = (idx[:, None] - idx[None, :]).abs()
    assert bool(mask[dist <= 6].all())  # the whole band
    assert not bool(mask[dist > 6 + 2 * 4].any())  # nothing beyond the band's blocks
    assert bool(mask.diagonal().all())


def test_vertical_stripes_cover_first_frame_and_text():
    for where in ("prefix", "suffix"):
        layout = TokenLayout(T, H, W, text_len=5, text_where=where)
        mask = _token_mask("vertical_stripe", layout)
        v0 = layout.video_start
        assert bool(mask[:, v0 : v0 + P].all())  # every row sees the whole first frame
        t0, t1 = layout.text_range
        assert bool(mask[:, t0:t1].all()) and bool(mask[t0:t1, :].all())  # text rows and columns
        # the last frame's keys are not attended by video rows (except through text-touching blocks)
        late = slice(v0 + 4 * P, v0 + 5 * P)
        assert not bool(mask[_video(layout)][:, late].all())


def test_multi_diagonal_offsets_are_multiples_of_tokens_per_frame():
    layout = TokenLayout(T, H, W)
    mask = _token_mask("multi_diagonal", layout, block=6, multi_window=0.5)  # ±6 tokens in spatial-major order
    coords = layout.video_coords()
    s = coords[:, 1] * W + coords[:, 2]
    # same spatial position in every frame: offsets ±k·P in the original order
    same_pos = s[:, None] == s[None, :]
    assert bool(mask[same_pos].all())
    q = 2 * P + 5  # frame 2, position 5
    attended = mask[q].nonzero().flatten()
    offsets = set(((attended - q) % P).tolist())
    # keys cluster around offsets that are multiples of P (a narrow spatial neighbourhood in every frame)
    assert offsets <= {0, 1, 2, 3, 4, 5, P - 1, P - 2, P - 3, P - 4, P - 5, P - 6}
    frames_hit = set((attended // P).tolist())
    assert frames_hit == set(range(T))
    assert mask.float().mean() < 0.6


def test_spatial_major_permutation_keeps_text():
    layout = TokenLayout(2, 1, 3, text_len=2, text_where="prefix")
    assert spatial_major_permutation(layout).tolist() == [0, 1, 2, 5, 3, 6, 4, 7]


def test_head_modes_and_grouping():
    layout = TokenLayout(T, H, W, text_len=3, text_where="suffix")
    modes = ["dense", "diagonal", "multi_diagonal", "vertical_stripe", "skip", "multi_diagonal"]
    groups = group_heads(modes)
    assert [g[0] for g in groups] == [[0, 1, 3, 4], [2, 5]]
    plan = build_group_plan(groups[0][1], layout, 4)
    assert plan.head_mode == (HEAD_DENSE, 0, 0, HEAD_SKIP)
    assert plan.perm is None and plan.check() is plan
    multi = build_group_plan(groups[1][1], layout, 4)
    assert multi.perm is not None
    assert group_heads(["skip", "skip"]) == []
    assert len(group_heads(["diagonal", "skip"])) == 1
    with pytest.raises(ValueError, match="own plan"):
        build_group_plan(["diagonal", "multi_diagonal"], layout, 4)
    with pytest.raises(ValueError, match="unknown"):
        mode_block_mask("diagonl", layout, 4)


def _write(tmp_path, layers, **extra):
    data = {"format": "dit-sparse/svdit", "version": 1, "heads": len(next(iter(layers.values()))),
            "num_layers": len(layers), "layers": layers, **extra}  # fmt: skip
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    return path


def _attend(method, q, k, v, layout, layer=0, backend="reference"):
    calls = []

    def kernel(q_, k_, v_, plan, return_lse=False, aux_work=False):
        calls.append(plan)
        out = block_sparse_attention(q_, k_, v_, plan, backend=backend)
        return out, None

    ctx = StepContext(0, None, "cond", f"blocks.{layer}.attn1", layer, layout)
    return method.attend(q, k, v, layout, ctx, kernel), calls


@pytest.mark.parametrize(("text_where", "text_len"), [("prefix", 5), ("suffix", 3), ("none", 0)])
def test_svdit_equals_reference_on_its_plans(tmp_path, text_where, text_len):
    layout = TokenLayout(T, H, W, text_len=text_len, text_where=text_where)  # N = 77 / 75 / 72
    modes = ["dense", "diagonal", "multi_diagonal", "vertical_stripe", "skip", "multi_diagonal"]
    path = _write(tmp_path, {"0": modes}, params={"block_size": 8, "diag_window": 0.5, "multi_window": 0.5})
    method = get_method("svdit", config=str(path))
    assert method.config.block_size == 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, len(modes), layout.seq_len, 8, generator=g) for _ in range(3))
    out, calls = _attend(method, q, k, v, layout)
    assert len(calls) == 2  # head fusion: one launch per token order
    flex, _ = _attend(method, q, k, v, layout, backend="flex")
    torch.testing.assert_close(flex, out, atol=1e-5, rtol=1e-5)
    # each head against a dense masked softmax of its own mode's token mask
    scores = (q @ k.transpose(-1, -2)) * 8**-0.5
    for h, mode in enumerate(modes):
        if mode == "skip":
            assert bool((out[:, h] == 0).all())
            continue
        mask = build_group_plan([mode], layout, 8, diag_window=0.5, multi_window=0.5).to_dense_mask()[0, 0]
        expected = torch.softmax(scores[:, h].masked_fill(~mask, float("-inf")), -1) @ v[:, h]
        torch.testing.assert_close(out[:, h], expected, atol=1e-5, rtol=1e-5)
    # plans are cached per (layer, layout)
    _, again = _attend(method, q, k, v, layout)
    assert again[0] is calls[0]


def test_single_launch_without_multi_diagonal(tmp_path):
    layout = TokenLayout(T, H, W)
    path = _write(tmp_path, {"0": ["diagonal", "skip"], "1": ["dense", "vertical_stripe"]})
    method = get_method("svdit", config=str(path), block_size=8)
    q = torch.randn(1, 2, layout.seq_len, 4)
    for layer in (0, 1):
        out, calls = _attend(method, q, q, q, layout, layer=layer)
        assert len(calls) == 1
    assert bool((out.abs().sum((0, 2, 3)) > 0).all())
    assert method.plan(q, q, layout, StepContext(0, None, "c", "l", 1, layout)).head_mode == (HEAD_DENSE, 0)


def test_config_round_trip(tmp_path):
    layers = {str(i): [MODES[(i + h) % len(MODES)] for h in range(4)] for i in range(3)}
    data = {"format": "dit-sparse/svdit", "version": 1, "heads": 4, "num_layers": 3, "layers": layers,
            "params": {"diag_window": 0.75, "multi_window": 1.5, "stripe_frames": 2, "block_size": 64}}  # fmt: skip
    path = tmp_path / "sub" / "cfg.json"
    save_config(data, path)
    assert load_config(path) == data
    method = get_method("svdit", config=path)
    assert method.geometry == {"diag_window": 0.75, "multi_window": 1.5, "stripe_frames": 2}
    assert method.config.block_size == 64
    assert method.layer_modes(2, 4) == layers["2"]
    assert method.describe()["modes"]["skip"] == sum(m.count("skip") for m in layers.values())


def test_bad_configs(tmp_path):
    with pytest.raises(SvditConfigError, match="cannot read"):
        get_method("svdit", config=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SvditConfigError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(SvditConfigError, match="unknown mode"):
        load_config(_write(tmp_path, {"0": ["dense", "diagonol"]}))
    with pytest.raises(SvditConfigError, match="missing: \\[1\\]"):
        load_config(_write(tmp_path, {"0": ["dense"], "2": ["skip"]}))
    with pytest.raises(SvditConfigError, match="lists 1 heads"):
        load_config(_write(tmp_path, {"0": ["dense", "skip"], "1": ["skip"]}))
    with pytest.raises(SvditConfigError, match="unfinished"):
        load_config(_write(tmp_path, {"0": ["dense"]}, complete=False))
    with pytest.raises(SvditConfigError, match="layers"):
        load_config(_write(tmp_path, {"0": ["dense"]}) and _rewrite(tmp_path, {"format": "dit-sparse/svdit"}))
    # head count and layer coverage against the model at call time
    method = get_method("svdit", config=str(_write(tmp_path, {"0": ["dense", "skip"]})), block_size=8)
    layout = TokenLayout(T, H, W)
    q = torch.randn(1, 3, layout.seq_len, 4)
    with pytest.raises(SvditConfigError, match="lists 2 heads for layer 0, the model has 3"):
        _attend(method, q, q, q, layout)
    with pytest.raises(SvditConfigError, match="no entry for self-attention layer 5"):
        _attend(method, q[:, :2], q[:, :2], q[:, :2], layout, layer=5)
    with pytest.raises(ValueError, match="default_mode"):
        get_method("svdit", default_mode="sparse")


def _rewrite(tmp_path, data):
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(data))
    return path


def test_no_config_runs_default_mode():
    method = get_method("svdit", default_mode="diagonal", block_size=8)
    layout = TokenLayout(T, H, W)
    q = torch.randn(1, 2, layout.seq_len, 4)
    with pytest.warns(UserWarning, match="without a configuration"):
        out, calls = _attend(method, q, q, q, layout)
    assert len(calls) == 1 and calls[0].density() < 0.8


def test_report_density_weights_each_launch_by_its_heads(tmp_path):
    """Two launches per layer (multi-diagonal + another mode): the report's density covers both head groups."""
    import dit_sparse
    from tests.tiny_dit import run, wan

    model, inputs = wan()
    path = _write(tmp_path, {"0": ["multi_diagonal", "diagonal"], "1": ["dense", "vertical_stripe"]})
    dit_sparse.apply(model, "svdit", config=str(path), block_size=16, min_seq_len=0, dense_steps=0)
    run(model, inputs)
    rep = dit_sparse.report(model)
    dit_sparse.remove(model)
    layout = TokenLayout(4, 8, 8)
    m = get_method("svdit", config=str(path), block_size=16)
    expected = []
    for modes in (["multi_diagonal", "diagonal"], ["dense", "vertical_stripe"]):
        geo = {k: getattr(m.config, k) for k in ("diag_window", "multi_window", "stripe_frames")}
        dens = [build_group_plan([mode], layout, 16, **geo).density() for mode in modes]
        expected.append(sum(dens) / len(dens))
    assert rep.density == pytest.approx(sum(expected) / 2, rel=1e-4)


def _attend_in(method, x, layout, transformer, layer=0):
    ctx = StepContext(0, None, "cond", f"blocks.{layer}.attn1", layer, layout, transformer=transformer)
    return method.attend(x, x, x, layout, ctx, lambda q_, k_, v_, plan, lse=False: (
        block_sparse_attention(q_, k_, v_, plan, backend="reference"), None))  # fmt: skip


def test_per_transformer_sections(tmp_path):
    """Wan 2.2's experts: one section per pipeline component, looked up by the call's (transformer, layer index)."""
    sections = {"transformer": {"heads": 2, "num_layers": 1, "layers": {"0": ["diagonal", "dense"]}},
                "transformer_2": {"heads": 2, "num_layers": 1, "layers": {"0": ["skip", "skip"]}}}  # fmt: skip
    path = tmp_path / "experts.json"
    save_config({"format": "dit-sparse/svdit", "version": 2, "transformers": sections, "params": {"block_size": 8}},
                path)  # fmt: skip
    method = get_method("svdit", config=str(path))
    assert method.layer_modes(0, 2, "transformer_2") == ["skip", "skip"]
    assert method.layer_modes(0, 2) == ["diagonal", "dense"]
    layout = TokenLayout(T, H, W)
    x = torch.randn(1, 2, layout.seq_len, 4)
    assert bool((_attend_in(method, x, layout, "transformer_2") == 0).all())
    assert bool((_attend_in(method, x, layout, "transformer").abs().sum((0, 2, 3)) > 0).all())  # cached apart
    assert method.describe()["modes"] == {"diagonal": 1, "dense": 1, "skip": 2}
    # a single-transformer file (every version-1 file) is the section of "transformer"
    single = get_method("svdit", config=str(_write(tmp_path, {"0": ["skip", "skip"]})), block_size=8)
    assert single.layer_modes(0, 2) == ["skip", "skip"]
    with pytest.raises(SvditConfigError, match="no section for 'transformer_2'"):
        single.layer_modes(0, 2, "transformer_2")
    with pytest.raises(SvditConfigError, match="both 'layers' and per-transformer sections"):
        save_config({"transformers": sections, "layers": {"0": ["dense"]}}, tmp_path / "x.json")
    with pytest.raises(SvditConfigError, match=r"\(transformer_2\).*unknown mode"):
        save_config({"transformers": {**sections, "transformer_2": {"layers": {"0": ["skipp"]}}}}, tmp_path / "x.json")


def test_recorded_layout_and_model_are_checked(tmp_path):
    """A config records the grid, text tokens and model it was searched on; another one is refused clearly."""
    import dit_sparse
    from dit_sparse.methods.svdit import config_fingerprint
    from tests.tiny_dit import cogvideox, run, wan

    model, inputs = wan()  # grid 4 x 8 x 8, no text tokens
    record = {"class": "WanTransformer3DModel", "fingerprint": config_fingerprint(model)}
    grid = {"frames": 4, "height": 8, "width": 8, "text_len": 0, "text_where": "none"}
    path = _write(tmp_path, {"0": ["diagonal", "dense"], "1": ["dense", "skip"]}, layout=grid, model=record)
    method = get_method("svdit", config=str(path), block_size=16)
    method.check_transformer("transformer", model)  # the model it was searched on
    with pytest.raises(SvditConfigError, match="searched on a WanTransformer3DModel .* this transformer is a "
                       "CogVideoXTransformer3DModel"):  # fmt: skip
        method.check_transformer("transformer", cogvideox()[0])
    other = type(model)(**{**model.config, "ffn_dim": 64})
    with pytest.raises(SvditConfigError, match=f"fingerprint {record['fingerprint']}.*run `dit-sparse search`"):
        method.check_transformer("transformer", other)
    with pytest.raises(SvditConfigError, match="run `dit-sparse search`"):  # up front, nothing changed
        dit_sparse.apply(other, "svdit", config=str(path), block_size=16, min_seq_len=0)
    assert get_tracker(other) is None
    # the layout, at call time through the processor
    dit_sparse.apply(model, "svdit", config=str(path), block_size=16, min_seq_len=0)
    try:
        run(model, inputs)
        half = {**inputs, "hidden_states": inputs["hidden_states"][..., :8]}  # grid 4 x 8 x 4
        with pytest.raises(SvditConfigError, match="searched on a 4x8x8 grid, 0 text tokens; this call has a 4x8x4"):
            run(model, half)
    finally:
        dit_sparse.remove(model)
