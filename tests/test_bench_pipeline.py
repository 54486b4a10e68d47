"""Whole-generation benchmark (``dit-sparse bench --pipeline``) on the CPU: configurations and their refusals, step
kinds derived from each method's own schedule on a tiny model, the composition, failure rows, results files and the
command's errors without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dit_sparse
from dit_sparse.bench import compose as C
from dit_sparse.bench import pipeline as P
from dit_sparse.bench.results import composed_s, format_pipeline_table, whole_s, write_pipeline_results
from dit_sparse.cli import main
from dit_sparse.methods import get_method

PASSES = ("cond", "uncond")


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return P.tiny_transformer("wan")


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _kinds(tiny: tuple, method: str, steps: int, **params) -> tuple[C.Schedule, list[int]]:
    model, inputs = tiny
    return C.step_kinds(model, _scheduler(), inputs, method, params, steps, PASSES)


# ------------------------------------------------------------------------------------------------ configurations


def test_parse_config_parts_and_refusals() -> None:
    c = P.parse_config("radial:decay=0.3+fbc+compile")
    assert c.method == ("radial", {"decay": 0.3}) and c.cache == "fbc" and c.compile and not c.sage
    assert P.parse_config("dense").method is None and P.parse_config("dense+compile").compile
    assert P.parse_config("sage").sage
    for text, reason in [
        ("radial+window", "one sparse method at a time"),
        ("fbc+taylorseer", "one step cache at a time"),
        ("sage+radial", "sage is dense INT8 attention"),
        ("radial+nosuch", "neither a method nor one of dense, sage, compile"),
        ("", "empty configuration"),
    ]:
        with pytest.raises(P.ConfigError, match=reason):
            P.parse_config(text)
    assert P.parse_config("radial+taylorseer").composable.startswith("taylorseer decides at run time")
    assert P.parse_config("radial+compile").composable is None


def test_every_pipeline_model_has_its_transformer_and_shape() -> None:
    from dit_sparse.bench import MODELS

    assert set(P.PIPELINES) == {"wan2.1-1.3b-480p", "wan2.1-1.3b-720p", "wan2.1-14b-720p", "hunyuanvideo-720p"}
    for pm in P.PIPELINES.values():
        assert pm.shape in MODELS[pm.model].shapes
    assert P.PIPELINES["wan2.1-14b-720p"].passes == PASSES and P.PIPELINES["hunyuanvideo-720p"].passes == ("cond",)
    assert MODELS["hunyuanvideo"].shapes["720p"] == (129, 720, 1280)


# ------------------------------------------------------------------------------------------------ step kinds


def test_radial_kinds_follow_its_scaled_warmup(tiny: tuple) -> None:
    schedule, steps = _kinds(tiny, "radial", 10)
    warm = get_method("radial").config.warmup_steps(10)  # 12 of 50 -> 2 of 10
    assert warm == 2
    assert [k for k, _ in schedule.kinds] == ["dense"] * warm + [schedule.kinds[warm][0]] * (10 - warm)
    assert schedule.counts() == {"dense": 2 * warm, schedule.kinds[warm][0]: 2 * (10 - warm)}
    assert steps == [0, warm]
    assert all(len(set(step)) == 1 for step in schedule.kinds)  # both CFG passes alike


def test_an_fp8_configuration_has_the_schedule_of_its_bf16_twin() -> None:
    """The schedule is derived on a CPU model, which has no fp8 kernel: the precision is left out there."""
    pm = P.PIPELINES["wan2.1-1.3b-480p"]
    fp8 = P.schedule_of(pm, P.parse_config("radial:precision=fp8"), _scheduler(), 6)
    bf16 = P.schedule_of(pm, P.parse_config("radial"), _scheduler(), 6)
    assert fp8[0].kinds == bf16[0].kinds and fp8[1] == bf16[1]


def test_taylorseer_predicts_every_block_on_its_cached_steps() -> None:
    """``taylorseer`` hooks every Wan block (Diffusers' default patterns hook none): after 3 full steps, 1 step in 5
    computes, and the latents differ from the dense ones."""
    from tiny_dit import generate_latents, wan_pipeline

    pipe = wan_pipeline()
    dense = generate_latents(pipe, steps=10)
    attn = pipe.transformer.blocks[0].attn1
    native, calls = attn.processor, []

    def counting(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    attn.set_processor(counting)
    P.configure(pipe, P.PIPELINES["wan2.1-1.3b-480p"], P.parse_config("taylorseer"))
    try:
        cached = generate_latents(pipe, steps=10)
    finally:
        pipe.transformer.disable_cache()
    assert len(calls) == 2 * (3 + 2)  # CFG passes x (steps 0-2, then steps 4 and 9 of the 5-step cycles)
    assert not torch.equal(cached, dense)


def test_adaspa_kinds_are_its_searches(tiny: tuple) -> None:
    schedule, steps = _kinds(tiny, "adaspa", 50)
    first_search, sparse, later_search = (schedule.kinds[s][0] for s in (10, 11, 30))
    assert len({"dense", first_search, sparse, later_search}) == 4
    assert first_search.startswith("full+LSE") and later_search.startswith("sparse +")
    assert schedule.steps_of(first_search) == [10] and schedule.steps_of(later_search) == [30]
    assert schedule.steps_of("dense") == list(range(10))
    assert steps == [0, 10, 11, 30]


def test_rettention_kinds_are_its_refresh_cycle(tiny: tuple) -> None:
    method = get_method("rettention", refresh_interval=3)
    schedule, steps = _kinds(tiny, "rettention", 12, refresh_interval=3)
    warm = method.config.warmup_steps(12)  # 15 of 50 -> 4 of 12
    refresh = [s for s in range(warm, 12) if (s - warm) % 3 == 0]
    assert refresh == [4, 7, 10]
    refresh_kinds = {schedule.kinds[s][0] for s in refresh}
    assert all(k.startswith("full+LSE, sparse+LSE(aux)") for k in refresh_kinds)
    others = {schedule.kinds[s][0] for s in range(warm, 12) if s not in refresh}
    assert not others & refresh_kinds and all(k.startswith("sparse") for k in others)
    assert schedule.steps_of("dense") == list(range(warm))
    assert steps[0] == 0 and set(refresh[:2]) <= set(steps) and steps[-1] <= 10


def test_skeleton_falls_back_when_the_state_depends_on_skipped_steps() -> None:
    full = {(0, "cond"): (), (5, "cond"): (("a",),)}
    assert C.check_skeleton(full, dict(full), [0, 5]) == [0, 5]
    assert C.check_skeleton(full, {(0, "cond"): (), (5, "cond"): (("b",),)}, [0, 5]) == list(range(6))


def test_recorder_gives_the_method_its_attend_back() -> None:
    method = get_method("radial")
    own = method.attend
    recorder = C.WorkRecorder(method)
    assert method.attend != own
    recorder.close()
    assert method.attend == own and "attend" not in method.__dict__


# ------------------------------------------------------------------------------------------------ composition


def test_compose_sums_the_schedule_and_needs_every_kind() -> None:
    schedule = C.Schedule(PASSES, (("dense", "dense"), ("sparse", "sparse"), ("sparse", "sparse")))
    assert schedule.counts() == {"dense": 2, "sparse": 4}
    assert C.compose(schedule, {"dense": 100.0, "sparse": 50.0}, rest_s=0.5) == pytest.approx(0.5 + 0.4)
    with pytest.raises(ValueError, match="no time for the step kind"):
        C.compose(schedule, {"dense": 100.0}, rest_s=0.0)
    dense = C.dense_schedule(50, PASSES)
    assert dense.counts() == {"forward": 100} and C.skeleton(dense) == [0]


def test_time_kinds_times_every_kind_of_the_skeleton(tiny: tuple) -> None:
    model, inputs = tiny
    schedule, steps = _kinds(tiny, "radial", 6)
    sched = _scheduler()
    sched.set_timesteps(6)
    holder = C._Holder(model, sched)
    dit_sparse.apply(holder, "radial")
    try:
        logs: list[str] = []
        first: list[tuple[str, float]] = []
        kind_ms = C.time_kinds(model, sched.timesteps, schedule, steps, inputs, repeats=1, log=logs.append,
                               first=first)  # fmt: skip
        rep = dit_sparse.report(model, reset=True)
    finally:
        dit_sparse.remove(model)
    assert set(kind_ms) == set(schedule.counts()) and all(ms > 0 for ms in kind_ms.values())
    assert "untimed pass" in logs[0]
    assert rep.sparse_calls > 0 and rep.dense_calls > 0  # the skeleton reached warm-up and sparse steps
    total = C.compose(schedule, kind_ms, 0.0)
    assert total == pytest.approx(sum(n * kind_ms[k] for k, n in schedule.counts().items()) / 1e3)
    # the untimed pass: one forward per skeleton step and CFG pass, in order
    assert [k for k, _ in first] == [schedule.kinds[i][j] for i in steps for j in range(len(PASSES))]
    assert C.cold_penalty_s(first, kind_ms) == pytest.approx(sum(ms - kind_ms[k] for k, ms in first) / 1e3)


def test_tuning_counts_cover_the_attention_and_block_mass_tuners(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    from types import SimpleNamespace

    logs = {name: [{"key": (1,), "config": "a", "ms": 1.0}] for name in P.TUNED_KERNELS}
    for name, log in logs.items():
        tuner = SimpleNamespace(log=log, kernel=name.rsplit(".", 1)[1])
        monkeypatch.setitem(sys.modules, name, SimpleNamespace(TUNER=tuner))
    marks = P.tuning_marks()
    attention, mass = (logs[name] for name in P.TUNED_KERNELS)
    attention += [{"key": (2,), "config": "a", "ms": 1.0}, {"key": (2,), "config": "b", "ms": 2.0},
                  {"key": (3,), "config": "a", "cached": "file"}]  # fmt: skip
    mass += [{"key": (2,), "config": "a", "ms": 1.0}]  # the same key tuple in another kernel: another key
    assert P.tuning_since(marks) == {
        "tuned_keys": 2, "stored_keys": 1, "tuned": ["block_mass (2,)", "triton_attention (2,)"]
    }  # fmt: skip


def test_cold_penalty_is_each_first_forwards_excess_over_its_kind() -> None:
    first = [("dense", 900.0), ("dense", 110.0), ("sparse", 2050.0), ("sparse", 60.0)]
    assert C.cold_penalty_s(first, {"dense": 100.0, "sparse": 50.0}) == pytest.approx((800 + 10 + 2000 + 10) / 1e3)


# ------------------------------------------------------------------------------------------------ rows and files


def _fake_launch(results: list[dict], seen: list[tuple]):
    def launch(job: dict, env: dict, timeout: float | None) -> dict:
        seen.append((job, env))
        return results[len(seen) - 1]

    return launch


def test_run_config_three_timings_from_two_processes() -> None:
    seen: list[tuple] = []
    calls = [{"denoise_s": 10.0, "decode_s": 1.0}, {"denoise_s": 8.0, "decode_s": 1.0}]
    launch = _fake_launch([{"calls": calls, "build_s": 2.0}, {"calls": [{"denoise_s": 9.0, "decode_s": 1.0}]}], seen)
    row = P.run_config("wan2.1-1.3b-480p", "radial", 50, P.TIMINGS, False, False, 2, launch=launch)
    assert whole_s(row["timings"]["cold"]) == 11.0 and whole_s(row["timings"]["steady"]) == 9.0
    assert whole_s(row["timings"]["warm"]) == 10.0 and "error" not in row
    (job1, env1), (job2, env2) = seen
    assert job1["calls"] == 2 and job2["calls"] == 1
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "DIT_SPARSE_TUNING_CACHE"):
        assert env1[var] == env2[var] and not Path(env1[var]).exists()  # shared, fresh, removed after the row


def test_run_config_failure_rows_keep_the_reason() -> None:
    seen: list[tuple] = []
    row = P.run_config(
        "wan2.1-1.3b-480p", "radial+window", 50, P.TIMINGS, False, False, 2, launch=_fake_launch([], seen)
    )
    assert row["error"].startswith("radial+window: one sparse method") and not seen
    row = P.run_config("wan2.1-1.3b-480p", "fbc", 50, P.TIMINGS, True, False, 2, launch=_fake_launch([], seen))
    assert row["error"].startswith("not composable: fbc decides at run time") and not seen
    crashed = {"calls": [], "error": "process exit 1: RuntimeError: CUDA out of memory"}
    row = P.run_config("wan2.1-1.3b-480p", "rettention", 50, P.TIMINGS, False, False, 2,
                       launch=_fake_launch([crashed], seen))  # fmt: skip
    assert "out of memory" in row["error"] and len(seen) == 1  # no warm process after a failed cold one


def test_launch_turns_a_crashing_worker_into_a_row() -> None:
    row = P._launch({"pipeline": "wan2.1-1.3b-480p", "config": "dense", "steps": 1, "calls": 1}, {}, 120)
    assert row["calls"] == [] and row["error"].startswith("process exit")


def _payload(rows: list[dict], mode: str = "pipeline") -> dict:
    return {"command": "dit-sparse bench --pipeline", "note": P.NOTE, "steps": 50, "mode": mode,
            "runs": [{"pipeline": "wan2.1-1.3b-480p", "rows": rows}]}  # fmt: skip


def test_results_files_table_ratios_and_failures(tmp_path: Path) -> None:
    call = {"denoise_s": 60.0, "decode_s": 3.0, "peak_gib": 4.7}
    fast = {"denoise_s": 39.0, "decode_s": 3.0, "peak_gib": 5.0, "density": 0.5}
    cold = {**fast, "denoise_s": 49.5, "tuned_keys": 3, "stored_keys": 9}
    rows = [
        {"config": "dense", "calls": [call], "timings": {"cold": call, "steady": call}},
        {"config": "radial", "calls": [cold, fast], "timings": {"cold": cold, "steady": fast}},
        P.failed_row("radial+window", "radial+window: one sparse method at a time (radial and window)"),
    ]
    table = format_pipeline_table(rows)
    assert "| radial | 0.500 | 52.5 | - | 42.0 | 1.20x | - | 1.50x | +25.0% |  | 3 / 9 | 5.0 |" in table
    assert "FAILED: radial+window: one sparse method" in table
    write_pipeline_results(_payload(rows), tmp_path / "r")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["runs"][0]["rows"][2]["error"] and data["environment"]["torch"] == torch.__version__
    md = (tmp_path / "r.md").read_text()
    assert "prompt embeddings given, text encoder not timed" in md and "## wan2.1-1.3b-480p" in md


def test_compose_results_print_composed_and_measured(tmp_path: Path) -> None:
    r = {"config": "radial", "calls": [], "composed_denoise_s": 45.0, "measured_denoise_s": 44.0, "decode_s": 3.0,
         "diff_pct": 100 * (45 / 44 - 1), "kinds": [{"kind": "dense", "forwards": 24, "forward_ms": 600.0}]}  # fmt: skip
    assert P.composition_line(r) == "composed 45.0 s, measured 44.0 s, diff +2.3%"
    assert P.composition_line({"composed_denoise_s": 45.0}) == "composed 45.0 s, measured - (no full run)"
    write_pipeline_results(_payload([r], "compose"), tmp_path / "c")
    md = (tmp_path / "c.md").read_text()
    assert "| radial | dense 24 × 600 | 48.0 | 47.0 | +2.3% |" in md
    dense = {"config": "dense", "composed_denoise_s": 60.0, "decode_s": 3.0, "cold_penalty_s": 2.0,
             "decode_cold_s": 4.0}  # fmt: skip
    radial = {**r, "cold_penalty_s": 12.0, "decode_cold_s": 4.0, "tuned_keys": 2, "stored_keys": 5}
    write_pipeline_results(_payload([dense, radial], "compose"), tmp_path / "c")
    md = (tmp_path / "c.md").read_text()
    # steady 63 vs 48 s; cold 60 + 2 + 4 = 66 vs 45 + 12 + 4 = 61 s
    assert "| 48.0 | 47.0 | +2.3% | 1.31x | 61.0 | 1.08x | +27.1% | 2 / 5 |" in md
    assert "| dense |  | 63.0 | - | - | 1.00x | 66.0 | 1.00x | +4.8% |" in md
    assert composed_s(dense, "cold") == 66.0 and composed_s(r, "cold") is None


# ------------------------------------------------------------------------------------------------ the command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--pipeline"], "needs an NVIDIA GPU"),
        (["bench", "--compose"], "--compose: only with --pipeline"),
        (["bench", "--pipeline", "--compose", "--measure", "--configs", "dense"], "needs an NVIDIA GPU"),
        (["bench", "--pipeline", "--measure"], "--measure compares a composed total"),
        (["bench", "--pipeline", "--methods", "radial"], "--pipeline takes --configs"),
        (["bench", "--pipeline", "--models", "cogvideox1.5-5b"], "no whole-pipeline benchmark for cogvideox1.5-5b"),
        (["bench", "--pipeline", "--shapes", "1080p"], "no whole-pipeline benchmark for wan2.1-1.3b at 1080p"),
    ],
)
def test_cli_errors_without_cuda(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_to_overwrite_results(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("{}")
    assert main(["bench", "--pipeline", "--out", str(tmp_path / "r")]) == 2
    assert "exists; choose another --out or pass --overwrite" in capsys.readouterr().err


def test_cli_delegates_models_and_configs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(P, "run", lambda *a, **k: seen.append((a, k)))
    argv = ["bench", "--pipeline", "--models", "wan2.1-1.3b", "wan2.1-14b", "--shapes", "720p", "--compose",
            "--configs", "dense", "radial+compile", "--out", str(tmp_path / "p")]  # fmt: skip
    assert main(argv) == 0
    (pipelines, configs, out), kw = seen[0]
    assert pipelines == ["wan2.1-1.3b-720p", "wan2.1-14b-720p"] and configs == ["dense", "radial+compile"]
    assert kw["compose"] and kw["repeats"] == 2 and kw["timings"] == P.TIMINGS


def test_pareto_joins_full_call_and_composed_results_each_against_its_own_dense(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pareto", Path(__file__).parents[1] / "benchmarks" / "pareto.py")
    pareto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pareto)
    full = {"mode": "pipeline", "runs": [{"pipeline": "m", "rows": [
        {"config": "dense", "timings": {"steady": {"denoise_s": 60.0, "decode_s": 3.0}}},
        {"config": "taylorseer", "timings": {"steady": {"denoise_s": 18.0, "decode_s": 3.0}}},
    ]}]}  # fmt: skip
    composed = {"mode": "compose", "runs": [{"pipeline": "m", "rows": [
        {"config": "dense", "composed_denoise_s": 40.0, "decode_s": 2.0},
        {"config": "radial", "composed_denoise_s": 19.0, "decode_s": 2.0},
        {"config": "radial+compile", "composed_denoise_s": 12.0, "decode_s": 2.0},
        {"config": "window", "error": "failed"},
    ]}]}  # fmt: skip
    quality = {"summary": [
        {"config": c, "psnr": {"mean": m, "ci95": 0.5}} for c, m in (("radial", 35.0), ("taylorseer", 30.0))
    ]}  # fmt: skip
    pts = {p["config"]: p for p in pareto.points([full, composed], quality, "m", "steady")}
    assert pts["taylorseer"]["speedup"] == pytest.approx(63 / 21)
    assert pts["radial"]["speedup"] == pytest.approx(42 / 21)
    assert pts["radial+compile"]["speedup"] == pytest.approx(3.0) and pts["radial+compile"]["psnr"] == 35.0
    assert set(pts) == {"taylorseer", "radial", "radial+compile"}
    with pytest.raises(SystemExit):
        pareto.points([composed], quality, "m", "cold")  # no dense cold figure to divide by
    cache_only = {"mode": "pipeline", "runs": [{"pipeline": "m", "rows": [full["runs"][0]["rows"][1]]}]}
    later = {p["config"]: p for p in pareto.points([composed, cache_only], quality, "m", "steady")}
    assert later["taylorseer"]["speedup"] == pytest.approx(42 / 21)  # the dense of the file before it
    with pytest.raises(SystemExit):
        pareto.points([cache_only], quality, "m", "steady")
    out = pareto.plot(list(pts.values()), tmp_path / "p.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_summarize_rewrites_the_summary_of_merged_rows_without_generating(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "quality_pipeline.py"
    spec = importlib.util.spec_from_file_location("quality_pipeline", path)
    qp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qp)
    texts = qp.prompts(3)
    rows = [{"label": "radial", "config": "radial", "prompt": t, "device": d, "psnr": v, "ssim": 0.9, "caption_ok": ok}
            for t, d, v, ok in zip(texts, ("cuda", "cuda", "cpu"), (30.0, 32.0, 34.0), (True, False, True), strict=True)]  # fmt: skip
    rows.append(
        {
            "label": "radial",
            "config": "radial",
            "prompt": "not among the first 3",
            "device": "cpu",
            "psnr": 0.0,
            "ssim": 0.0,
        }
    )
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert qp.main(["--out", str(tmp_path), "--prompts", "3", "--configs", "radial", "--summarize"]) == 0
    (s,) = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert s["videos"] == 3 and s["devices"] == {"cpu": 1, "cuda": 2} and s["captions_passed"] == 2
    assert s["psnr"]["mean"] == pytest.approx(32.0)
    md = (tmp_path / "summary.md").read_text()
    assert "| 3 (cpu 1, cuda 2) | 2 |" in md and "run on cpu, cuda" in md
