"""What a run reports: ``results.csv``, the per-setting summary and its text table, and ``pareto.png``."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dit_sparse.eval.specs import method_label
from dit_sparse.files import atomic_write_text
from dit_sparse.methods.base import split_method_spec

__all__ = ["CSV_FIELDS", "fmt", "format_table", "num", "plot_pareto", "short_labels", "summarize", "write_csv"]


def num(v: Any) -> float | None:
    """A row value as a float (``"inf"`` → inf), None where absent."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def fmt(v: Any, spec: str) -> str:
    """A row value formatted with ``spec``; ``n/a`` where absent, ``inf`` where infinite."""
    x = num(v)
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf"
    return format(x, spec)


CSV_FIELDS = [
    "label",
    "method",
    "prompt",
    "seed",
    "psnr",
    "ssim",
    "lpips",
    "lpips_status",
    "caption_ok",
    "attn_out_rel_l2",
    "attn_lse_rel_l2",
    "density",
    "effective_density",
    "attention_ms_per_step",
    "transformer_ms_per_step",
    "dense_transformer_ms_per_step",
    "speedup",
    "seconds",
    "dense_seconds",
    "e2e_speedup",
    "timing",
    "calls",
    "sparse_calls",
    "dense_calls",
    "params",
    "settings",
    "dtype",
    "backend",
    "error_sample",
    "model_id",
    "fingerprint",
    "video",
    "device",
    "device_name",
    "torch",
    "triton",
    "diffusers",
    "python",
    "date",
]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All rows as CSV (params and settings as JSON text), written atomically."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _mean(values: Iterable[Any]) -> float | None:
    xs = [x for x in (num(v) for v in values) if x is not None]
    if not xs:
        return None
    finite = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(finite) if finite else xs[0]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method setting (label): means over prompts and seeds (PSNR over finite values; inf if all are)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        out.append(
            {
                "label": label,
                "videos": len(rs),
                **{
                    k: _mean(r.get(k) for r in rs)
                    for k in (
                        "psnr",
                        "ssim",
                        "lpips",
                        "caption_ok",
                        "attn_out_rel_l2",
                        "effective_density",
                        "attention_ms_per_step",
                        "transformer_ms_per_step",
                        "dense_transformer_ms_per_step",
                        "speedup",
                    )
                },
            }
        )
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a fixed-width text table."""
    cols = [
        ("setting", "label", "s"),
        ("n", "videos", "d"),
        ("PSNR", "psnr", ".2f"),
        ("SSIM", "ssim", ".4f"),
        ("LPIPS", "lpips", ".4f"),
        ("caption", "caption_ok", ".2f"),
        ("attn err", "attn_out_rel_l2", ".4f"),
        ("density", "effective_density", ".3f"),
        ("attn ms/step", "attention_ms_per_step", ".2f"),
        ("xfmr ms/step", "transformer_ms_per_step", ".2f"),
        ("dense ms/step", "dense_transformer_ms_per_step", ".2f"),
        ("speedup", "speedup", ".2f"),
    ]
    cells = [[h for h, _, _ in cols]]
    for s in summary:
        cells.append([str(s[k]) if f in ("s", "d") else fmt(s[k], f) for _, k, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def short_labels(rows_or_summary: list[dict[str, Any]]) -> dict[str, str]:
    """Label → a shorter one for plots: parameters set alike in every setting of a method are left out."""
    labels = list(dict.fromkeys(r["label"] for r in rows_or_summary))
    parsed = {}
    for label in labels:
        try:
            parsed[label] = split_method_spec(label)
        except ValueError:
            parsed[label] = (label, {})
    out = {}
    for label, (name, params) in parsed.items():
        same = [p for n, p in parsed.values() if n == name]
        keep = {k: v for k, v in params.items() if len(same) > 1 and any(p.get(k) != v for p in same)}
        out[label] = method_label(name, keep)
    if len(set(out.values())) < len(out):  # shortening made two alike: keep the full labels
        return {label: label for label in labels}
    return out


def plot_pareto(summary: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Speedup (x) vs PSNR (y), one labelled point per setting, the Pareto front dashed; infinite PSNR on top.

    Points are labelled with :func:`short_labels`; the full settings are listed under the plot when they differ.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    short = short_labels(summary)
    pts = [(s["label"], num(s["speedup"]), num(s["psnr"])) for s in summary]
    finite = [p for _, _, p in pts if p is not None and math.isfinite(p)]
    top = (max(finite) + 3.0) if finite else 50.0
    xs = [1.0 if x is None else x for _, x, y in pts if y is not None]
    x_mid = (min(xs) + max(xs)) / 2 if xs else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    xy = []
    for label, x, y in pts:
        if y is None:
            continue
        x = 1.0 if x is None else x
        shown = top if math.isinf(y) else y
        ax.scatter([x], [shown], s=40, zorder=3, marker="^" if math.isinf(y) else "o")
        right = x > x_mid and len(xs) > 1
        ann = ax.annotate(
            short[label] + (" (PSNR inf)" if math.isinf(y) else ""),
            (x, shown),
            textcoords="offset points",
            xytext=(-6 if right else 6, 5),
            fontsize=8,
            ha="right" if right else "left",
        )
        ann.set_in_layout(False)
        xy.append((x, shown))
    front = sorted(p for p in xy if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in xy))
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", lw=1, zorder=2, label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    ax.axvline(1.0, color="lightgrey", lw=1, zorder=1)
    ax.set_xlabel("speedup vs dense (transformer time per step)")
    ax.set_ylabel("PSNR vs dense video (dB)")
    ax.set_title(title or "quality vs speed", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.12)
    notes = [f"{short[label]} = {label}" for label in short if short[label] != label]
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", ha="left", family="monospace")
        fig.tight_layout(rect=(0, 0.03 + 0.025 * len(notes), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
