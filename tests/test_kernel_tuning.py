"""The autotuner object: the best configuration is timed once per key and cached, every timing is logged, failing
candidates are skipped; the block-mass kernel tunes through it (Triton's CPU interpreter, timing faked)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dit_sparse.kernels.tuning import Tuner


def test_tuner_times_each_candidate_once_per_key_and_keeps_the_fastest():
    tuner: Tuner[str] = Tuner("toy")
    timed = []
    speeds = {"a": 3.0, "b": 1.0, "c": 2.0}

    def time_ms(cfg):
        timed.append(cfg)
        return speeds[cfg]

    assert tuner.pick((64, "bf16"), ["a", "b", "c"], time_ms, shape=[1, 2]) == "b"
    assert tuner.pick((64, "bf16"), ["a", "b", "c"], time_ms) == "b" and timed == ["a", "b", "c"]  # cached
    assert tuner.log == [
        {"key": "(64, 'bf16')", "config": c, "shape": [1, 2], "ms": speeds[c]} for c in ("a", "b", "c")
    ]
    assert tuner.pick((128, "bf16"), ["a", "c"], time_ms) == "c" and len(timed) == 5  # another key is tuned apart
    assert tuner.best == {(64, "bf16"): "b", (128, "bf16"): "c"}
    tuner.forget(lambda key: key[0] == 64)
    assert tuner.best == {(128, "bf16"): "c"}
    assert tuner.last is None and tuner.used("c") == "c" and tuner.last == "c"


def test_tuner_skips_failing_candidates_and_says_when_none_runs():
    tuner: Tuner[str] = Tuner("toy")

    def time_ms(cfg):
        if cfg == "big":
            raise RuntimeError("out of shared memory")
        return 1.0

    assert tuner.pick(("k",), ["big", "small"], time_ms) == "small"
    assert tuner.log[0] == {"key": "('k',)", "config": "big", "error": "RuntimeError: out of shared memory"}
    with pytest.raises(RuntimeError, match=r"no toy configuration ran for \('j',\); see its tuner's log"):
        tuner.pick(("j",), ["big"], time_ms)
    assert ("j",) not in tuner.best


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_block_mass_tunes_through_its_tuner(monkeypatch):
    from dit_sparse.kernels import block_mass as bm

    configs = [bm.MassConfig(1, 4, 1), bm.MassConfig(1, 2, 1)]
    fake_ms = iter([5.0, 1.0])

    def do_bench(fn, **kwargs):
        fn()  # the candidate really runs (interpreter)
        return next(fake_ms)

    monkeypatch.setattr(bm, "candidate_configs", lambda block, interpret: configs)
    monkeypatch.setattr(bm.triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(bm, "TUNER", Tuner("triton block mass"))
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 40, 16, generator=g) for _ in range(2))
    ref, _ = bm.reference_block_mass(q, k, 16, None, 0.25)
    for _ in range(2):  # the second call reuses the cached choice (no more timings: fake_ms would run out)
        mass, _ = bm.triton_block_mass(q, k, 16, None, 0.25)
        assert (mass - ref).abs().max() <= 1e-4
    assert bm.TUNER.last == configs[1] and list(bm.TUNER.best.values()) == [configs[1]]
    assert [e["ms"] for e in bm.TUNER.log] == [5.0, 1.0] and bm.TUNER.log[0]["shape"] == [1, 1, 40, 16]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_attention_records_its_launch_configuration(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from dit_sparse.kernels import block_sparse_attention
    from dit_sparse.kernels import triton_attention as ta
    from dit_sparse.plan import BlockPlan

    q = torch.randn(1, 2, 64, 16, dtype=torch.float16)
    block_sparse_attention(q, q, q, BlockPlan.full(64, 32), backend="triton")
    assert ta.TUNER.last == ta.KernelConfig(32, 32, 4, 1)  # the interpreter's one candidate, fitted to the blocks
    block_sparse_attention(q, q, q, BlockPlan.full(64, 16), backend="triton")
    assert ta.TUNER.last == ta.KernelConfig(16, 16, 4, 1)


def test_random_plans_for_pre_tuning_have_the_asked_density_and_order():
    from dit_sparse.tune import random_plan

    g = torch.Generator().manual_seed(0)
    for density, kept in ((1.0, 8), (0.25, 2), (0.01, 1)):  # 1000 tokens in 8 blocks of 128 (the last partial)
        plan = random_plan(1000, 3, 128, density, generator=g)
        assert plan.kv_num_blocks.shape == (1, 3, 8) and (plan.kv_num_blocks == kept).all() and plan.perm is None
        assert (plan.block_mask().sum(-1) == kept).all()
    plan = random_plan(1000, 3, 128, 0.5, True, generator=g)
    assert sorted(plan.perm.tolist()) == list(range(1000)) and plan.perm.tolist() != list(range(1000))
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0.0"):
        random_plan(1000, 3, 128, 0.0)


def test_pre_tuning_says_it_needs_cuda_and_the_cache(monkeypatch):
    from dit_sparse.kernels.tuning_cache import ENV
    from dit_sparse.tune import TuneError, tune

    with pytest.raises(TuneError, match="tune needs a CUDA GPU .*got device cpu"):
        tune([(1, 2, 256)], device="cpu")
    with pytest.raises(TuneError, match="unknown kernel.* flash; choose among attention, block-mass"):
        tune([(1, 2, 256)], kernels=["flash"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(ENV, "off")
    with pytest.raises(TuneError, match=f"the tuning cache is off .*unset {ENV}"):
        tune([(1, 2, 256)])
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("DIT_SPARSE_AUTOTUNE", "0")
    with pytest.raises(TuneError, match=r"autotuning is off \(DIT_SPARSE_AUTOTUNE=0\): nothing would be tuned"):
        tune([(1, 2, 256)])
