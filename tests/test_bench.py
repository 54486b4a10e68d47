"""dit_sparse.bench on CPU: published configs give the real token counts; each family's ``make_inputs`` drives a tiny
model of the same class through a forward, apply/remove; run() refuses without CUDA; tables and result files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_sparse
from dit_sparse import bench

CPU = torch.device("cpu")

# published shape -> self-attention sequence length (video tokens, + joint text for CogVideoX / HunyuanVideo)
EXPECTED_TOKENS = {
    ("wan2.1-1.3b", "480p"): 21 * 30 * 52,
    ("wan2.1-1.3b", "720p"): 21 * 45 * 80,
    ("wan2.1-14b", "480p"): 32_760,
    ("wan2.1-14b", "720p"): 75_600,
    ("cogvideox1.5-5b", "768x1360"): 226 + 11 * 48 * 85,
    ("hunyuanvideo", "720p"): 118_800 + 256,
    ("wan2.2-ti2v-5b", "720p"): 31 * 22 * 40,
    ("hunyuanvideo1.5", "480p"): 31 * 30 * 53 + 729 + 256 + 1000,
    ("ltx2", "512x768"): 16 * 16 * 24,
}
PARAMS_B = {
    "wan2.1-1.3b": 1.42,
    "wan2.1-14b": 14.29,
    "cogvideox1.5-5b": 5.57,
    "hunyuanvideo": 12.82,
    "wan2.2-ti2v-5b": 5.00,
    "hunyuanvideo1.5": 8.33,
    "ltx2": 18.88,
}


class _SelfAttentionLengths(TorchFunctionMode):
    """Sequence lengths of the self-attention SDPA calls (N_q == N_k)."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is F.scaled_dot_product_attention:
            q, k = bench._query_key(args, kwargs or {})
            if q.shape[-2] == k.shape[-2]:
                self.lengths.append(q.shape[-2])
        return func(*args, **(kwargs or {}))


def test_published_configs_on_meta() -> None:
    """Full-size configs build (meta device: no memory), have the published sizes, and give the real shapes."""
    assert EXPECTED_TOKENS[("wan2.1-1.3b", "480p")] == 32_760 and EXPECTED_TOKENS[("wan2.1-1.3b", "720p")] == 75_600
    assert {m for m, _ in EXPECTED_TOKENS} == set(bench.MODELS)
    meta = torch.device("meta")
    for name, spec in bench.MODELS.items():
        with meta:
            model = getattr(diffusers, spec.cls_name)(**spec.config)
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PARAMS_B[name], abs=0.01)
        assert spec.source and spec.describe()
        for shape_name, shape in spec.shapes.items():
            inputs, tokens = spec.make_inputs(model, shape, meta, torch.bfloat16)
            assert tokens == EXPECTED_TOKENS[(name, shape_name)], (name, shape_name)
            assert all(v.device == meta for v in inputs.values() if isinstance(v, torch.Tensor))
    cog = bench.MODELS["cogvideox1.5-5b"]
    with meta:
        model = getattr(diffusers, cog.cls_name)(**cog.config)
    inputs, _ = cog.make_inputs(model, cog.shapes["768x1360"], meta, torch.bfloat16)
    assert inputs["hidden_states"].shape == (1, 22, 16, 96, 170)  # 21 latent frames padded to 22
    assert all(t.shape == (11 * 48 * 85, 64) for t in inputs["image_rotary_emb"])
    hv = bench.MODELS["hunyuanvideo"]
    assert hv.build_config() | {"num_layers": 20, "num_single_layers": 40} == hv.config
    assert "num_layers=2 of 20" in hv.describe() and "num_single_layers=4 of 40" in hv.describe()
    assert "num_layers=10 of 40" in bench.MODELS["wan2.1-14b"].describe()


TINY: dict[str, tuple[bench.ModelSpec, bench.Shape]] = {
    "wan": (
        dataclasses.replace(
            bench.MODELS["wan2.1-1.3b"],
            config=dict(
                bench.MODELS["wan2.1-1.3b"].config,
                num_attention_heads=2,
                attention_head_dim=12,
                text_dim=32,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
            ),
        ),
        (9, 64, 64),  # latent 3 x 8 x 8 -> 3 x 4 x 4 = 48 tokens
    ),
    "cogvideox": (
        dataclasses.replace(
            bench.MODELS["cogvideox1.5-5b"],
            config=dict(
                bench.MODELS["cogvideox1.5-5b"].config,
                num_attention_heads=2,
                attention_head_dim=16,
                in_channels=4,
                out_channels=4,
                time_embed_dim=8,
                text_embed_dim=32,
                num_layers=2,
                sample_height=32,
                sample_width=32,
                max_text_seq_length=16,
            ),
        ),
        (17, 64, 96),  # latent 5 frames padded to 6 -> 3 x 4 x 6 = 72 video tokens after 16 text tokens
    ),
    "hunyuan": (
        dataclasses.replace(
            bench.MODELS["hunyuanvideo"],
            config=dict(
                bench.MODELS["hunyuanvideo"].config,
                in_channels=4,
                out_channels=4,
                num_attention_heads=2,
                attention_head_dim=10,
                num_layers=1,
                num_single_layers=1,
                num_refiner_layers=1,
                text_embed_dim=16,
                pooled_projection_dim=8,
                rope_axes_dim=(2, 4, 4),
            ),
            subset={},
        ),
        (9, 64, 64),  # latent 3 x 8 x 8 -> 3 x 4 x 4 = 48 video tokens + 256 text tokens
    ),
}
TINY_TOKENS = {"wan": 48, "cogvideox": 16 + 72, "hunyuan": 48 + bench.HUNYUAN_TEXT_TOKENS}


def _forward(model: Any, inputs: dict[str, Any], steps: Any) -> torch.Tensor:
    with torch.inference_mode(), bench._step(model, steps):
        return model(**inputs)[0]


@pytest.mark.parametrize("family", list(TINY))
def test_tiny_inputs_forward_apply_remove(family: str) -> None:
    spec, shape = TINY[family]
    model = bench.build_model(spec, CPU, torch.float32)
    torch.manual_seed(1)
    inputs, tokens = spec.make_inputs(model, shape, CPU, torch.float32)
    assert tokens == TINY_TOKENS[family]
    seen = _SelfAttentionLengths()
    with seen:
        ref = _forward(model, inputs, iter([0]))
    assert max(seen.lengths) == tokens  # the sequence the self-attention really sees
    assert torch.isfinite(ref).all()

    dit_sparse.apply(model, "dense", min_seq_len=0, block_size=16, dense_steps=0)
    try:
        steps = iter(range(3))
        outs = [_forward(model, inputs, steps) for _ in range(3)]
        rep = dit_sparse.report(model)
    finally:
        dit_sparse.remove(model)
    assert rep.sparse_calls > 0 and rep.density == pytest.approx(1.0)
    assert rep.steps == 3 and rep.cfg_passes == ["cond"] and rep.generations == 1  # one fresh step per forward
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(_forward(model, inputs, iter([0])), ref)  # removed: bit-exact


def test_build_model_casts_like_from_pretrained() -> None:
    spec, _ = TINY["wan"]
    model = bench.build_model(spec, CPU, torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32  # in WanTransformer3DModel._keep_in_fp32_modules
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    fresh = getattr(diffusers, spec.cls_name)(**spec.config)
    assert model.rope.freqs_cos.dtype == fresh.rope.freqs_cos.dtype != torch.bfloat16  # non-persistent: left alone


def test_run_needs_cuda_and_checks_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        bench.run(["wan2.1-1.3b"], None, ["window"], 1, None, "test")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        bench.run(quick=True)
    with pytest.raises(ValueError, match="unknown model"):
        bench.run(["sora"], None, None, 1, None, "")
    with pytest.raises(ValueError, match="unknown shape"):
        bench.run(["hunyuanvideo"], ["480p"], None, 1, None, "")


def _row(method: str, ms: float, speedup: float, density: float) -> bench.BenchRow:
    share = 0.74
    limit = 1 / ((1 - share) + share * density)
    return bench.BenchRow(
        "hunyuanvideo",
        "720p",
        119_056,
        method,
        {},
        ms,
        [ms, ms + 1],
        speedup,
        density,
        share,
        limit,
        speedup / limit,
        note="timed subset: num_layers=2 of 20",
    )


def test_format_table_and_write_results(tmp_path: Path) -> None:
    rows = [_row("dense", 2477.25, 1.0, 1.0), _row("radial", 1012.5, 2.45, 0.105)]
    table = bench.format_table(rows)
    assert "| hunyuanvideo | 720p | 119056 | radial | 1012.5 | 2.45x | 0.105 | 0.74 |" in table
    assert table.count("timed subset: num_layers=2 of 20") == 1
    bench.write_results(rows, tmp_path / "sub" / "e2e-test", "python benchmarks/e2e.py --quick")
    data = json.loads((tmp_path / "sub" / "e2e-test.json").read_text())
    assert data["command"] == "python benchmarks/e2e.py --quick"
    assert [r["method"] for r in data["rows"]] == ["dense", "radial"] and data["rows"][1]["forward_ms"] == 1012.5
    assert data["models"]["hunyuanvideo"]["config"]["num_single_layers"] == 40
    assert {"device", "torch", "diffusers", "date"} <= set(data["environment"])
    md = (tmp_path / "sub" / "e2e-test.md").read_text()
    assert "2477.2" in md and "2.45x" in md and "timed subset" in md and "--quick" in md
