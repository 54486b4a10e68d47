"""Quality of the whole-generation configurations on the embedded model: PSNR / SSIM against dense and the caption
check, over 50 seeded prompts, each a mean with a 95% interval (GPU or CPU).

Same configuration names as ``dit-sparse bench --pipeline`` (``benchmarks/pipeline.py``), so that
``benchmarks/pareto.py`` can join the two. The embedded model has 4,096 video tokens (16 x 16 x 16): at the methods'
default 128-token blocks that is 32 blocks a row and densities of 0.48-0.81, far denser than the 0.07-0.35 they
reach on the full-size models at 720p. Each method therefore runs at a matched-density setting (``MATCHED``: 32-token
blocks, the 10-step schedule's warm-up and cycles; every row records its measured sparse-call and all-call densities,
and the output says which setting ran). ``compile`` computes what its eager configuration computes: it has no quality row of its
own. ``sage`` needs CUDA (its row says so on the CPU). The pieces are the eval's own: ``dit_sparse.eval``
generation (the pipeline call, ``dit_sparse.apply``), metrics (PSNR, SSIM, caption check) and rows file.
A configuration with ``precision=fp8`` is also compared with its bf16 twin (the same configuration without it) on the
same prompt: PSNR / SSIM against that video (``psnr_vs_bf16``), the twin generated when it is not in the run.

    python benchmarks/quality_pipeline.py --out benchmarks/results/quality-pipeline-X [--configs dense radial fbc]

Writes ``<out>/rows.jsonl`` row by row (a rerun resumes), ``<out>/summary.json`` and ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from dit_sparse.bench.pipeline import ConfigError, parse_config
from dit_sparse.eval.generation import generate
from dit_sparse.eval.metrics import caption_ok, psnr, ssim
from dit_sparse.eval.settings import load_pipeline, resolve_settings
from dit_sparse.eval.store import append_row, jsonable, load_rows
from dit_sparse.files import atomic_write_json, atomic_write_text, environment

# matched-density settings on the embedded model (16 x 16 x 16 tokens, 10 steps, no CFG); the sparse-call densities
# they reach there (CPU probe, one prompt) against those at Wan2.1-1.3B 720p (e2e-2026-11-23-720p-dynamic.md):
# window 0.11 (0.075), draft 0.25 (0.28), adaspa 0.30 (0.20), rettention 0.31 (0.24). Radial's density is set by the
# frame count (its window halves with each doubling of the temporal distance): at 16 latent frames its sparsest
# setting is 0.50 (block 32, min_window 32), against 0.29 at 720p's 21 frames of 3,600 tokens.
MATCHED: dict[str, dict[str, Any]] = {
    "window": {"block_size": 32, "tile": (1, 4, 8), "window": (1, 1, 1)},
    "radial": {"block_size": 32, "min_window": 32},
    "draft": {"block_size": 32, "pool": (4, 8)},
    "adaspa": {"block_size": 32, "search_interval": 4},
    "rettention": {"block_size": 32},
}
CONFIGS = ["dense", "window", "radial", "draft", "adaspa", "rettention", "sage", "fbc", "taylorseer", "radial+fbc",
           "radial+taylorseer"]  # fmt: skip
T95 = 1.96  # normal approximation of the 95% interval (n = 50)


def prompts(n: int, seed: int = 0) -> list[str]:
    """The first ``n`` distinct captions of the embedded model's grammar drawn from ``seed`` (a repeated caption would
    be the same video twice: seed 0 repeats two among its first 50 draws)."""
    from dit_sparse.train.data import sample_scene

    rng = random.Random(seed)
    texts: dict[str, None] = {}
    while len(texts) < n:
        texts[sample_scene(rng).caption] = None
    return list(texts)


def interval(values: list[float]) -> dict[str, float | int | None]:
    """Mean and the half-width of its 95% interval (normal approximation); finite values only."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "ci95": None, "n": 0}
    half = T95 * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None
    return {"mean": statistics.fmean(xs), "ci95": half, "n": len(xs)}


@contextlib.contextmanager
def configured(pipe: Any, config: str):  # noqa: ANN201
    """(method, params) of ``config`` at its matched setting, with its step cache / sage active meanwhile."""
    cfg = parse_config(config)
    if cfg.sage and not torch.cuda.is_available():
        raise RuntimeError("sageattention runs on CUDA only")
    if cfg.cache is not None:
        from dit_sparse.bench.pipeline import configure

        configure(pipe, None, dataclasses.replace(cfg, method=None, compile=False))  # the step cache only
    mode = None
    if cfg.sage:
        from dit_sparse.bench.pipeline import SageSDPA

        mode = SageSDPA()
    try:
        with mode if mode is not None else contextlib.nullcontext():
            method = cfg.method[0] if cfg.method else None
            yield method, ({**MATCHED.get(method, {}), **cfg.method[1]} if cfg.method else None)
    finally:
        if cfg.cache is not None:
            pipe.transformer.disable_cache()


def bf16_twin(config: str) -> str | None:
    """The configuration ``config`` is an fp8 variant of (``radial:precision=fp8`` → ``radial``), or None."""
    parts = config.split("+")
    for i, part in enumerate(parts):
        name, _, params = part.partition(":")
        kept = [kv for kv in params.split(",") if kv and kv.replace(" ", "") != "precision=fp8"]
        if params and len(kept) < len(params.split(",")):
            parts[i] = name + (":" + ",".join(kept) if kept else "")
            return "+".join(parts)
    return None


def run(pipe: Any, config: str, prompt: str, settings: Any, videos: dict[str, torch.Tensor]) -> tuple[Any, str | None]:
    """One generation of ``config`` (kept in ``videos``) and its setting's description."""
    with configured(pipe, config) as (method, params):
        g = generate(pipe, prompt, 0, settings, method=method, params=params, progress=False)
    videos[config] = g.video
    return g, (f"{method}:{params}" if method else None)


def summarize(rows: list[dict[str, Any]], configs: list[str]) -> list[dict[str, Any]]:
    """Mean and 95% interval per configuration; a (configuration, prompt) generated twice (runs merged) counts once,
    its latest row."""
    latest = {(r["config"], r["prompt"]): r for r in rows}
    out = []
    for config in configs:
        rs = [r for (c, _), r in latest.items() if c == config]
        if not rs:
            continue
        errors = [r["error"] for r in rs if r.get("error")]
        ok = [r for r in rs if not r.get("error")]
        out.append({
            "config": config,
            "setting": rs[0].get("setting"),
            "videos": len(ok),
            "psnr": interval([r["psnr"] for r in ok]),
            "ssim": interval([r["ssim"] for r in ok]),
            "caption": interval([float(r["caption_ok"]) for r in ok if r.get("caption_ok") is not None]),
            "captions_passed": sum(bool(r.get("caption_ok")) for r in ok),
            "devices": dict(sorted(Counter(str(r.get("device")) for r in ok).items())),
            "density": interval([r["density"] for r in ok if r.get("density") is not None]),
            "effective_density": interval([r["effective_density"] for r in ok if r.get("effective_density") is not None]),
            "psnr_vs_bf16": interval([r["psnr_vs_bf16"] for r in ok if r.get("psnr_vs_bf16") is not None]),
            "ssim_vs_bf16": interval([r["ssim_vs_bf16"] for r in ok if r.get("ssim_vs_bf16") is not None]),
            "error": errors[0] if errors else None,
        })  # fmt: skip
    return out


def _ci(s: dict[str, Any], spec: str) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:{spec}}" + (f" ± {s['ci95']:{spec}}" if s["ci95"] is not None else "")


def format_summary(summary: list[dict[str, Any]], n: int) -> str:
    lines = [
        f"| config | setting on the embedded model | sparse-call density | all-call density | PSNR dB | SSIM | "
        f"videos (of {n} prompts) | captions passed | "
        "PSNR vs bf16 twin | SSIM vs bf16 twin | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for s in summary:
        devices = ", ".join(f"{k} {v}" for k, v in s.get("devices", {}).items())
        note = f"FAILED: {s['error']}" if s["error"] else ""
        lines.append(
            f"| {s['config']} | {s['setting'] or ''} | {_ci(s['density'], '.3f')} | "
            f"{_ci(s['effective_density'], '.3f')} | {_ci(s['psnr'], '.2f')} | "
            f"{_ci(s['ssim'], '.4f')} | {s['videos']} ({devices}) | {s['captions_passed']} | {_ci(s['psnr_vs_bf16'], '.2f')} | "
            f"{_ci(s['ssim_vs_bf16'], '.4f')} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (rows.jsonl, summary.json, summary.md)")
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--prompts", type=int, default=50, help="seeded prompts (default 50)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the embedded model's 10)")
    p.add_argument("--summarize", action="store_true",
                   help="generate nothing: rewrite the summary of the rows already in --out (e.g. rows of GPU and CPU "
                   "runs merged)")  # fmt: skip
    args = p.parse_args(argv)
    for config in args.configs:
        try:
            parse_config(config)
        except ConfigError as e:
            p.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = load_rows(rows_path)
    texts = prompts(args.prompts)
    configs = [c for c in args.configs if "compile" not in c.split("+")]
    if not args.summarize:
        generate_rows(rows, rows_path, texts, configs, args.device, args.steps)
    summary = summarize([r for r in rows if r["prompt"] in texts], configs)  # a longer earlier run: its first n
    skipped = [c for c in args.configs if c not in configs]
    devices = ", ".join(sorted({str(r.get("device")) for r in rows if r["prompt"] in texts}))
    steps = resolve_settings(args.steps, embedded=True).steps
    note = (f"embedded model, {steps} denoising steps, {len(texts)} seeded prompts (seed 0 each), run on {devices} "
            "(per row: column videos); "
            "PSNR/SSIM against the dense video of the same prompt on the same device; 95% intervals: mean ± 1.96 s/√n; "
            "methods at matched-density settings (column 2)"
            + (f"; {', '.join(skipped)}: compile computes what its eager configuration computes" if skipped else ""))  # fmt: skip
    atomic_write_json(out / "summary.json", {"environment": environment(), "command": " ".join(sys.argv),
                                             "note": note, "summary": summary})  # fmt: skip
    table = format_summary(summary, len(texts))
    atomic_write_text(out / "summary.md", f"# Quality of the whole-generation configurations\n\n{note}.\n\n{table}\n")
    print(table)
    return 0


def generate_rows(rows: list[dict[str, Any]], rows_path: Path, texts: list[str], configs: list[str],
                  device: str | None, steps: int | None) -> None:  # fmt: skip
    """Generate every (configuration, prompt) not in ``rows`` yet, appending each row to ``rows`` and the file."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(device=device)
    settings = resolve_settings(steps, embedded=True)
    done = {(r["config"], r["prompt"]) for r in rows}
    for i, prompt in enumerate(texts, 1):
        todo = [c for c in configs if (c, prompt) not in done]
        if not todo:
            continue
        dense = generate(pipe, prompt, 0, settings, progress=False)
        ref = dense.video
        videos: dict[str, torch.Tensor] = {"dense": ref}
        for config in todo:
            row: dict[str, Any] = {"label": config, "config": config, "prompt": prompt, "seed": 0, "device": device}
            try:
                # dense is the reference itself (same prompt, seed and settings): not generated twice
                g, row["setting"] = (dense, None) if config == "dense" else run(pipe, config, prompt, settings, videos)
                video = g.video
                rep = g.report or {}
                row.update(psnr=psnr(ref, video), ssim=ssim(ref, video), caption_ok=caption_ok(video, prompt),
                           density=rep.get("density"), effective_density=rep.get("effective_density"))  # fmt: skip
                twin = bf16_twin(config)
                if twin is not None:
                    other = videos[twin] if twin in videos else run(pipe, twin, prompt, settings, videos)[0].video
                    row.update(psnr_vs_bf16=psnr(other, video), ssim_vs_bf16=ssim(other, video))
            except Exception as e:  # noqa: BLE001 - a configuration that cannot run is a row with its reason
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            append_row(rows_path, jsonable(row))
            rows.append(jsonable(row))
        print(f"[{i}/{len(texts)}] {prompt!r}: " + ", ".join(
            f"{r['config']} {float(r.get('psnr', 'nan')):.1f}" for r in rows[-len(todo):]), flush=True)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
