"""Pareto plot: whole-generation speedup (``bench --pipeline`` results JSONs) against PSNR on the embedded model
(a ``benchmarks/quality_pipeline.py`` summary.json), one point per configuration found in both.

    python benchmarks/pareto.py benchmarks/results/pipeline-X.json [pipeline-Y.json ...] \\
        --quality benchmarks/results/quality-pipeline-X/summary.json --model wan2.1-1.3b-480p --timing steady \\
        --out benchmarks/results/pareto-X.png

Speedup = dense's whole generation (denoising + decode) / the configuration's, each against the dense of its own
results file (same run and timing; a composed file's rows give steady and, where recorded, cold figures); a file
without a dense row takes the dense of the file before it (give the files of one device call in a row); a
configuration in several files keeps its first. PSNR as a mean with its 95% interval (error bars). Dense itself (1.0x, PSNR infinite) is not
drawn. Configurations without a quality row (``+compile``) take their eager configuration's quality (compile computes
the same thing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dit_sparse.bench.results import composed_s, whole_s


def row_s(row: dict[str, Any], mode: str, timing: str) -> float | None:
    """Seconds of one configuration's whole generation at ``timing``: a call's, or the composed figure (steady or
    cold)."""
    if mode == "compose":
        return composed_s(row, timing)
    return whole_s(row.get("timings", {}).get(timing))


def speedups(pipeline: dict[str, Any], model: str, timing: str, dense: float | None = None) -> dict[str, float]:
    """Configuration -> whole-generation speedup against dense at ``timing`` (cold / warm / steady); ``dense``: the
    dense seconds to use when the file has no dense row (another file of the same device call)."""
    runs = [r for r in pipeline["runs"] if r["pipeline"] == model]
    if not runs:
        raise SystemExit(
            f"no run of {model} in the pipeline results; it has {[r['pipeline'] for r in pipeline['runs']]}"
        )
    mode = pipeline.get("mode", "pipeline")
    rows = {r["config"]: row_s(r, mode, timing) for r in runs[0]["rows"] if not r.get("error")}
    dense = rows.get("dense") or dense
    if not dense:
        raise SystemExit(f"no dense {timing} timing of {model}: the speedups need it")
    return {"dense": dense, **{c: dense / s for c, s in rows.items() if s and c != "dense"}}


def points(pipelines: list[dict[str, Any]], quality: dict[str, Any], model: str, timing: str) -> list[dict[str, Any]]:
    """(config, speedup, PSNR mean, PSNR 95% half-width) of every configuration with both figures."""
    psnr = {s["config"]: s["psnr"] for s in quality["summary"] if s["psnr"]["mean"] is not None}
    merged: dict[str, float] = {}
    dense = None
    for pipeline in pipelines:
        ratios = speedups(pipeline, model, timing, dense)
        dense = ratios.pop("dense")
        for config, speedup in ratios.items():
            merged.setdefault(config, speedup)
    out = []
    for config, speedup in merged.items():
        eager = "+".join(p for p in config.split("+") if p != "compile") or "dense"
        q = psnr.get(config) or psnr.get(eager)
        if q is not None and eager != "dense":
            out.append({"config": config, "speedup": speedup, "psnr": q["mean"], "ci95": q["ci95"] or 0.0})
    return out


def plot(pts: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in pts:
        ax.errorbar(p["speedup"], p["psnr"], yerr=p["ci95"], fmt="o", capsize=3)
        ax.annotate(p["config"], (p["speedup"], p["psnr"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("whole-generation speedup vs dense")
    ax.set_ylabel("PSNR vs dense on the embedded model (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline_json", type=Path, nargs="+", help="bench --pipeline results (full calls or composed)")
    p.add_argument("--quality", type=Path, required=True, help="quality_pipeline.py's summary.json")
    p.add_argument("--model", default="wan2.1-1.3b-480p", help="pipeline model of the speedups")
    p.add_argument("--timing", default="steady", choices=["cold", "warm", "steady"])
    p.add_argument("--out", type=Path, required=True, help="the PNG to write (refused when it exists)")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists; choose another --out")
    pipelines = [json.loads(path.read_text()) for path in args.pipeline_json]
    quality = json.loads(args.quality.read_text())
    pts = points(pipelines, quality, args.model, args.timing)
    if not pts:
        p.error("no configuration has both a speedup and a PSNR; are the two files of the same configurations?")
    env = pipelines[0].get("environment", {})
    plot(pts, args.out, f"{args.model}, {args.timing}, {env.get('device', '')}; quality: embedded model")
    for q in sorted(pts, key=lambda q: -q["speedup"]):
        print(f"{q['config']:24s} {q['speedup']:.2f}x  PSNR {q['psnr']:.2f} ± {q['ci95']:.2f} dB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
