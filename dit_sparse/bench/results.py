"""Benchmark rows, their markdown tables and the result files (JSON + markdown)."""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dit_sparse.bench.models import MODELS
from dit_sparse.files import environment


@dataclass
class BenchRow:
    """One (model, shape, method) result; ``note`` says what was timed (subset of blocks, input choices)."""

    model: str
    shape: str
    tokens: int
    method: str
    params: dict
    forward_ms: float
    forward_ms_all: list[float]
    speedup: float
    density: float
    attention_share: float
    amdahl_limit: float
    fraction_of_limit: float
    extra: dict = field(default_factory=dict)
    note: str = ""
    # the same forward with the model compiled (``compile`` != "none"; see the module docstring)
    compile: str = "none"
    compiled_ms: float | None = None
    compiled_ms_all: list[float] = field(default_factory=list)
    compiled_speedup: float | None = None  # vs the compiled dense forward
    compiled_speedup_vs_eager: float | None = None  # vs the eager dense forward
    compiled_attention_share: float | None = None
    compiled_amdahl_limit: float | None = None
    compiled_fraction_of_limit: float | None = None


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table of the rows, followed by each model's note (with compiled rows: eager and compiled figures
    side by side, and what the compiled warm-up forwards took)."""
    if any(r.compiled_ms is not None for r in rows):
        return _format_compiled(rows)
    head = "| model | shape | tokens | method | forward ms | speedup | density | attn share | Amdahl limit | of limit |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.shape} | {r.tokens} | {r.method} | {r.forward_ms:.1f} | {r.speedup:.2f}x | "
            f"{r.density:.3f} | {r.attention_share:.2f} | {r.amdahl_limit:.2f}x | {r.fraction_of_limit:.0%} |"
        )
    notes = dict.fromkeys((r.model, r.note) for r in rows if r.note)
    if notes:
        lines += ["", *(f"- {model}: {note}" for model, note in notes)]
    return "\n".join(lines)


def _format_compiled(rows: list[BenchRow]) -> str:
    head = (
        "| model | shape | tokens | method | density | eager ms | speedup | attn share | Amdahl limit | of limit | "
        "compiled ms | vs compiled dense | vs eager dense | compiled attn share | compiled Amdahl limit | of limit |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        eager = (
            f"| {r.model} | {r.shape} | {r.tokens} | {r.method} | {r.density:.3f} | {r.forward_ms:.1f} | "
            f"{r.speedup:.2f}x | {r.attention_share:.2f} | {r.amdahl_limit:.2f}x | {r.fraction_of_limit:.0%} |"
        )
        if r.compiled_ms is None:
            lines.append(eager + " - | - | - | - | - | - |")
        else:
            lines.append(
                f"{eager} {r.compiled_ms:.1f} | {r.compiled_speedup:.2f}x | {r.compiled_speedup_vs_eager:.2f}x | "
                f"{r.compiled_attention_share:.2f} | {r.compiled_amdahl_limit:.2f}x | {r.compiled_fraction_of_limit:.0%} |"
            )
    notes = [f"- {model}: {note}" for model, note in dict.fromkeys((r.model, r.note) for r in rows if r.note)]
    modes = sorted({r.compile for r in rows if r.compiled_ms is not None})
    notes.append(
        f"- compiled ({', '.join(modes)}; blocks = regional compile_repeated_blocks, full = torch.compile(transformer); "
        "inductor, dynamic=False): dense = the model's own processors compiled; methods = dit_sparse applied, their "
        "self-attention the custom op dit_sparse::attend (no graph break; DIT_SPARSE_GRAPH_OPS=0: a graph break). Untimed warm-up forwards absorb compilation; compiled attn share = "
        "eager dense SDPA time / compiled dense forward"
    )
    for (model, shape), group in itertools.groupby(rows, key=lambda r: (r.model, r.shape)):
        group = [r for r in group if r.compiled_ms is not None]
        if group:
            warm = ", ".join(
                f"{r.method} {' + '.join(f'{s:.1f}' for s in r.extra.get('compiled_warmup_s', []))} s" for r in group
            )
            extra = [f"{r.method} {r.extra['compiled_graphs_while_timed']}" for r in group
                     if r.extra.get("compiled_graphs_while_timed")]  # fmt: skip
            timed = f"; graphs compiled while timed: {', '.join(extra)}" if extra else "; no graph compiled while timed"
            notes.append(f"- {model} {shape} untimed warm-up forwards (compilation included): {warm}{timed}")
    for r in rows:
        if "compiled_error" in r.extra:
            notes.append(
                f"- {r.model} {r.shape} {r.method} compiled ({r.compile}): FAILED, {r.extra['compiled_error']}"
            )
    return "\n".join([*lines, "", *notes])


def write_results(rows: list[BenchRow], out: Path, command: str) -> None:
    """``out``.json (rows + environment + command + model configs) and ``out``.md (the table and notes)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    used = dict.fromkeys(r.model for r in rows)
    models = {
        m: {
            "class": MODELS[m].cls_name,
            "config": MODELS[m].config,
            "subset": MODELS[m].subset,
            "quick_subset": MODELS[m].quick_subset,
            "source": MODELS[m].source,
        }
        for m in used
        if m in MODELS
    }
    payload = {
        "environment": env,
        "command": command or " ".join(sys.argv),
        "models": models,
        "rows": [r.__dict__ for r in rows],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    md = [
        "# End-to-end transformer forward, dense vs sparse",
        "",
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}, {env['date']}",
        f"Command: `{payload['command']}`",
        "",
        format_table(rows),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))


# ------------------------------------------------------------------------------------------------ whole generations


def whole_s(call: dict | None) -> float | None:
    """Seconds of one whole generation: denoising + VAE decode (None when the call is missing)."""
    if not call or call.get("denoise_s") is None:
        return None
    return call["denoise_s"] + call.get("decode_s", 0.0)


def _ratio(dense: float | None, value: float | None) -> str:
    return f"{dense / value:.2f}x" if dense and value else "-"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_pipeline_table(rows: list[dict]) -> str:
    """Markdown table of one model's whole-generation rows (timings = denoising + decode; ratios vs ``dense``)."""
    dense = next((r for r in rows if r["config"] == "dense" and not r.get("error")), None)
    ref = {t: whole_s(dense["timings"].get(t)) if dense else None for t in ("cold", "warm", "steady")}
    lines = [
        "| config | density | cold s | warm-process first s | steady s | cold vs dense | warm vs dense | "
        "steady vs dense | cold penalty | warm penalty | cold keys tuned / stored | peak GiB | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        t = {k: whole_s(r.get("timings", {}).get(k)) for k in ("cold", "warm", "steady")}
        density = next((c["density"] for c in reversed(r.get("calls", [])) if c.get("density") is not None), None)
        peak = max((c["peak_gib"] for c in r.get("calls", []) if c.get("peak_gib") is not None), default=None)
        note = f"FAILED: {r['error']}" if r.get("error") else ""
        cold = r.get("timings", {}).get("cold") or {}
        keys = f"{cold['tuned_keys']} / {cold['stored_keys']}" if "tuned_keys" in cold else ""
        lines.append(
            f"| {r['config']} | {'' if density is None else f'{density:.3f}'} | {_s(t['cold'])} | {_s(t['warm'])} | "
            f"{_s(t['steady'])} | {_ratio(ref['cold'], t['cold'])} | {_ratio(ref['warm'], t['warm'])} | "
            f"{_ratio(ref['steady'], t['steady'])} | {_penalty(t['cold'], t['steady'])} | "
            f"{_penalty(t['warm'], t['steady'])} | {keys} | {_s(peak)} | {note} |"
        )
    return "\n".join(lines)


def _penalty(first: float | None, steady: float | None) -> str:
    """How much slower a first call is than the steady state (``+12.3%``), blank without both."""
    return f"{100.0 * (first / steady - 1.0):+.1f}%" if first and steady else ""


def composed_s(row: dict, timing: str = "steady") -> float | None:
    """Seconds of a composed whole generation (denoising + decode) at ``timing`` ("steady" or "cold"; None when the
    row lacks it)."""
    if row.get("composed_denoise_s") is None:
        return None
    if timing == "steady":
        return row["composed_denoise_s"] + row.get("decode_s", 0.0)
    if timing == "cold" and row.get("cold_penalty_s") is not None and row.get("decode_cold_s") is not None:
        return row["composed_denoise_s"] + row["cold_penalty_s"] + row["decode_cold_s"]
    return None


def format_compose_table(rows: list[dict]) -> str:
    """Markdown table of one model's composed rows (denoising + decode; ratios vs the composed ``dense``)."""
    dense = next((r for r in rows if r["config"] == "dense" and not r.get("error")), None)
    ref = {t: composed_s(dense, t) if dense else None for t in ("steady", "cold")}
    lines = [
        "| config | step kinds (forwards × ms) | composed s | measured s | diff | composed vs dense | "
        "composed cold s | cold vs dense | cold penalty | cold keys tuned / stored | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        kinds = "; ".join(f"{k['kind']} {k['forwards']} × {k['forward_ms']:.0f}" for k in r.get("kinds", []))
        diff = f"{r['diff_pct']:+.1f}%" if r.get("diff_pct") is not None else "-"
        note = f"FAILED: {r['error']}" if r.get("error") else ""
        steady, cold = composed_s(r), composed_s(r, "cold")
        measured = r["measured_denoise_s"] + r.get("decode_s", 0.0) if r.get("measured_denoise_s") is not None else None
        keys = f"{r['tuned_keys']} / {r['stored_keys']}" if "tuned_keys" in r else ""
        lines.append(
            f"| {r['config']} | {kinds} | {_s(steady)} | {_s(measured)} | {diff} | {_ratio(ref['steady'], steady)} | "
            f"{_s(cold)} | {_ratio(ref['cold'], cold)} | {_penalty(cold, steady)} | {keys} | {note} |"
        )
    return "\n".join(lines)


def write_pipeline_results(payload: dict, out: Path) -> None:
    """``out``.json (the payload + environment) and ``out``.md (one table per model), rewritten atomically."""
    from dit_sparse.files import atomic_write_json, atomic_write_text

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload.setdefault("environment", environment())
    atomic_write_json(out.with_suffix(".json"), payload)
    env = payload["environment"]
    compose = payload.get("mode") == "compose"
    md = [
        f"# Whole generation{', composed from the schedule' if compose else ''}, {payload['steps']} steps",
        "",
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}, "
        f"{env['date']}. {payload['note']}.",
        f"Command: `{payload['command']}`",
    ]
    if not compose:
        md.append("Seconds per whole generation: denoising + VAE decode. Cold: new process, empty Triton, inductor "
                  "and dit_sparse tuning caches; warm-process first: first call of a second process on those caches; "
                  "steady: second call of the first process. Peak: GPU memory allocated while denoising.")  # fmt: skip
    else:
        md.append("Composed = every forward at the time of its step kind (derived from the method's own schedule on "
                  "a tiny model of the same class) + the pipeline without its transformer + one VAE decode; "
                  "measured = one full call in the same process (steady). Composed cold = composed + each kind's "
                  "first forward's excess over its steady time in that process (new, on empty Triton, inductor and "
                  "tuning caches) + the process's first VAE decode.")  # fmt: skip
    for run in payload["runs"]:
        table = format_compose_table(run["rows"]) if compose else format_pipeline_table(run["rows"])
        md += ["", f"## {run['pipeline']}", "", table]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
