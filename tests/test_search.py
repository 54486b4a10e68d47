"""Sparse-vDiT offline search on a tiny random Wan pipeline: finishes, resumes, and its config reproduces the error."""

from __future__ import annotations

import json

import pytest
import torch

import dit_sparse
from dit_sparse.cli import build_parser
from dit_sparse.methods.svdit import load_config
from dit_sparse.methods.svdit_search import SearchSettings, choose_modes
from dit_sparse.offline_search import search
from dit_sparse.plan import BlockPlan

BLOCK = 16


@pytest.fixture(scope="module")
def pipe():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    return WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )  # fmt: skip


def _prompts(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"prompt_embeds": torch.randn(1, 8, 32, generator=g)} for _ in range(n)]


# latent grid 4 × 8 × 8 = 256 tokens: 16 blocks of 16
CALL = {"height": 128, "width": 128, "num_frames": 13, "guidance_scale": 1.0}


def test_search_finishes_and_config_reproduces_error(pipe, tmp_path):
    out = tmp_path / "svdit.json"
    settings = SearchSettings(error_budget=0.6)
    data = search(pipe, _prompts(1), out, steps=1, settings=settings, block_size=BLOCK, progress=False, **CALL)
    assert data["complete"] and data["num_layers"] == 2 and data["heads"] == 2
    assert data["layout"] == {"frames": 4, "height": 8, "width": 8, "text_len": 0, "text_where": "none"}
    assert data["cost_model"]["backend"] == "reference" and "CPU" in data["cost_model"]["note"]
    assert set(load_config(out)["layers"]) == {"0", "1"}
    assert any(m != "dense" for modes in data["layers"].values() for m in modes)  # the budget lets sparse modes in
    assert not hasattr(pipe.transformer.attn_processors["blocks.0.attn1.processor"], "method")  # removed

    # run the searched config; on layer 0 (same inputs as in the search) the per-head error equals the recorded one
    dit_sparse.apply(pipe, "svdit", config=str(out), min_seq_len=0)
    try:
        proc = pipe.transformer.attn_processors["blocks.0.attn1.processor"]
        method, measured = proc.method, {}
        original = method.attend

        def attend(q, k, v, layout, ctx, kernel):
            o = original(q, k, v, layout, ctx, kernel)
            if ctx.layer_index == 0 and ctx.step == 0:
                ref, _ = kernel(q, k, v, BlockPlan.full(q.shape[-2], BLOCK), False)
                measured["mse"] = (o.float() - ref.float()).square().mean(dim=(0, 2, 3)).tolist()
            return o

        method.attend = attend
        pipe(**_prompts(1)[0], num_inference_steps=1, generator=torch.Generator().manual_seed(0),
             output_type="latent", **CALL)  # fmt: skip
    finally:
        dit_sparse.remove(pipe)
    assert measured["mse"] == pytest.approx(data["errors"]["0"]["mse"], rel=1e-4, abs=1e-9)


class _Flaky:
    """A pipeline that fails on its n-th call (an interrupted search)."""

    def __init__(self, pipe, fail_at: int):
        self._pipe, self.calls, self.fail_at = pipe, 0, fail_at

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        return self._pipe(**kwargs)


def test_search_resumes(pipe, tmp_path):
    out = tmp_path / "svdit.json"
    kwargs = dict(steps=1, layers_per_pass=1, block_size=BLOCK, progress=False, **CALL)
    flaky = _Flaky(pipe, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        search(flaky, _prompts(2), out, **kwargs)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and list(partial["layers"]) == ["0"]  # layer 0 done, layer 1 not
    assert len(partial["search"]["state"]["done_prompts"]) == 0
    again = _Flaky(pipe, fail_at=0)
    data = search(again, _prompts(2), out, **kwargs)
    assert again.calls == 2  # only layer 1's pass over the two prompts
    assert data["complete"] and data["layers"]["0"] == partial["layers"]["0"]
    assert search(again, _prompts(2), out, **kwargs) == data and again.calls == 2  # finished: nothing to do


def _stats(power, mse, density):
    return {"count": 1, "power": power, "mse": mse, "density": density}


def test_selection_rules():
    modes = ("diagonal", "vertical_stripe", "skip")
    stats = _stats(
        power=[1.0, 1.0, 1e-4],
        mse={"diagonal": [0.01, 0.5, 1e-5], "vertical_stripe": [0.02, 0.9, 1e-5], "skip": [1.0, 1.0, 1e-4]},
        density={"diagonal": 0.3, "vertical_stripe": 0.1, "skip": 0.0},
    )
    cost = {"a_s": 1e-4, "b_s": 1e-3}
    cheap = choose_modes(stats, SearchSettings(candidates=modes, error_budget=0.05), cost)
    assert cheap == ["vertical_stripe", "dense", "skip"]  # cheapest within budget; none fits: dense; tiny head: skip
    paper = choose_modes(stats, SearchSettings(candidates=modes, selection="paper", eps=0.4), cost)
    # Eq. 2: MSE + 0.5·(1 - S): head 0 -> diagonal 0.16, stripe 0.07, skip 1.0; head 1 all > 0.4 -> dense
    assert paper == ["vertical_stripe", "dense", "skip"]
    with pytest.raises(ValueError, match="selection"):
        SearchSettings(selection="fastest")


def test_cli_registration():
    parser = build_parser()
    args = parser.parse_args(["search", "--model", "m", "--prompts", "a cat", "a dog", "--out", "c.json"])
    assert args.prompts == ["a cat", "a dog"] and args.steps == 10 and callable(args.func)


def test_static_methods_inside_a_pipeline(pipe, tmp_path):
    """radial and svdit through dit_sparse.apply on the tiny pipeline (processor, layout, policy, report)."""
    call = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent", **CALL)
    dense = pipe(**_prompts(1)[0], **call).frames
    dit_sparse.apply(pipe, "radial", block_size=BLOCK, min_window=16, decay=0.5, dense_steps=1, min_seq_len=0)
    try:
        out = pipe(**_prompts(1)[0], **call).frames
        rep = dit_sparse.report(pipe)
    finally:
        dit_sparse.remove(pipe)
    assert rep.sparse_calls == 1 and rep.dense_calls == 3  # step 0 dense, layer 0 dense (default 1)
    assert rep.density < 1.0 and torch.isfinite(out).all() and not torch.equal(out, dense)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"heads": 2, "num_layers": 2, "layers": {"0": ["diagonal", "multi_diagonal"],
                                                                         "1": ["skip", "vertical_stripe"]}}))  # fmt: skip
    dit_sparse.apply(pipe, "svdit", config=str(path), block_size=BLOCK, min_seq_len=0, error_sample=1)
    try:
        out = pipe(**_prompts(1)[0], **call).frames
        rep = dit_sparse.report(pipe)
    finally:
        dit_sparse.remove(pipe)
    assert rep.sparse_calls == 4 and torch.isfinite(out).all()


def test_search_paper_rule_feeding_chosen_outputs(pipe, tmp_path):
    settings = SearchSettings(selection="paper", feed="chosen", candidates=("diagonal", "skip"))
    data = search(pipe, _prompts(1), tmp_path / "p.json", steps=2, settings=settings, block_size=BLOCK,
                  progress=False, **CALL)  # fmt: skip
    assert data["complete"] and data["search"]["feed"] == "chosen"
    assert {m for modes in data["layers"].values() for m in modes} <= {"dense", "diagonal", "skip"}
    assert all(0.0 <= d <= 1.0 for d in data["density"].values())


def test_two_expert_wan22_pipeline_gets_one_section_per_expert(tmp_path):
    """Wan 2.2 (transformer + transformer_2, boundary_ratio): each expert's layers are searched and written apart."""
    from diffusers import WanTransformer3DModel

    from dit_sparse.methods.svdit import config_fingerprint
    from tests.tiny_dit import wan, wan_pipeline

    first, _ = wan()
    torch.manual_seed(1)
    second = WanTransformer3DModel(**first.config).eval()  # same architecture, other weights
    # 2 steps at shift 7: timesteps 1000 (>= 0.9 * 1000: transformer) and 875 (transformer_2)
    pipe = wan_pipeline(first, transformer_2=second, boundary_ratio=0.9)
    out = tmp_path / "wan22.json"
    data = search(pipe, _prompts(1), out, steps=2, settings=SearchSettings(error_budget=0.6), block_size=BLOCK,
                  progress=False, **CALL)  # fmt: skip
    assert "layers" not in data and set(data["transformers"]) == {"transformer", "transformer_2"}
    one, two = data["transformers"]["transformer"], data["transformers"]["transformer_2"]
    assert set(one["layers"]) == set(two["layers"]) == {"0", "1"} and one["num_layers"] == two["num_layers"] == 2
    assert one["errors"]["0"]["mse"] != two["errors"]["0"]["mse"]  # measured on each expert, not shared
    assert one["model"]["fingerprint"] == two["model"]["fingerprint"] == config_fingerprint(first)
    state = data["search"]["state"]["stats"]
    assert set(state) == {"transformer", "transformer_2"} and all(s["0"]["count"] == 1 for s in state.values())
    assert load_config(out) == data
    assert not hasattr(second.attn_processors["blocks.0.attn1.processor"], "method")  # both removed


def test_search_function_shadows_no_module():
    """``dit_sparse.search`` is the function; the modules have their own names (no module hidden behind it)."""
    import importlib.util

    from dit_sparse.methods.svdit_search import SvditSearch

    assert dit_sparse.search is search and importlib.util.find_spec("dit_sparse.search") is None
    assert SvditSearch.__module__ == "dit_sparse.methods.svdit_search"
