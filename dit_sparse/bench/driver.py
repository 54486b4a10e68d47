"""The end-to-end benchmark run: dense vs each method on each model and shape, eager then compiled."""

from __future__ import annotations

import gc
import itertools
import statistics
from pathlib import Path
from typing import Any

import torch

from dit_sparse.bench.forward import COMPILE_MODES, _warmup_s, attention_time, compile_model, time_forward
from dit_sparse.bench.models import MODELS, QUICK_MODELS, QUICK_REPEATS, ModelSpec, build_model
from dit_sparse.bench.results import BenchRow, format_table, write_results


def _check_args(models: list[str], shapes: list[str] | None, methods: list[str]) -> list[tuple[str, dict]]:
    """Fail on unknown models/shapes/methods before any model is built; the parsed method specs."""
    from dit_sparse.methods import parse_method_spec

    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    for shape in shapes or []:
        if not any(shape in MODELS[name].shapes for name in models):
            known = sorted({s for name in models for s in MODELS[name].shapes})
            raise ValueError(f"unknown shape {shape!r} for {', '.join(models)}; known: {', '.join(known)}")
    return [parse_method_spec(m) for m in methods]


def run(
    models: list[str] | None = None,
    shapes: list[str] | None = None,
    methods: list[str] | None = None,
    repeats: int = 5,
    out: str | Path | None = None,
    command: str = "",
    *,
    quick: bool = False,
    compile: str = "none",
    device: str | torch.device | None = None,
) -> list[BenchRow]:
    """Time dense vs each method spec (``"radial"``, ``"window:window=1,1,1"``) on each model and shape.

    ``shapes`` names shapes of any of the models (a model without that shape is skipped; None: all of each model's).
    ``quick``: a light pass for a small GPU budget (about 4 minutes on an H100): models default to
    ``QUICK_MODELS``, at most ``QUICK_REPEATS`` repeats after 1 warm-up, and each model's ``quick_subset`` of blocks.
    ``compile``: ``none``, ``blocks`` or ``full``: also time every row with the model compiled (module docstring).
    ``device``: default CUDA (required); another device (tests: ``"cpu"``, fp32) times with the wall clock.
    """
    import dit_sparse
    from dit_sparse.methods import get_method

    models = list(models or (QUICK_MODELS if quick else ["wan2.1-1.3b"]))
    methods = list(methods or ["window", "radial", "rettention", "draft", "adaspa"])
    specs = _check_args(models, shapes, methods)
    if compile not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
    if device is None and not torch.cuda.is_available():
        raise RuntimeError(
            "dit_sparse.bench times CUDA kernels on full-size models and needs an NVIDIA GPU; no CUDA device is "
            f"visible here (torch {torch.__version__}). Use `dit-sparse eval` on the CPU."
        )
    device = torch.device(device if device is not None else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup = 1 if quick else 2
    if quick:
        repeats = min(repeats, QUICK_REPEATS)
    rows: list[BenchRow] = []
    for name in models:
        spec = MODELS[name]
        note = spec.describe(quick)
        print(f"== {name}: {note}", flush=True)
        model = build_model(spec, device, dtype, quick)
        for shape_name in [s for s in shapes or list(spec.shapes) if s in spec.shapes]:
            inputs, tokens = spec.make_inputs(model, spec.shapes[shape_name], device, dtype)
            steps = itertools.count()
            dense_ms = time_forward(model, inputs, repeats, warmup, steps)
            dense = statistics.median(dense_ms)
            attn_ms, attn_fwd_ms = attention_time(model, inputs, steps, min(1024, tokens))
            share = attn_ms / attn_fwd_ms
            rows.append(
                BenchRow(
                    name, shape_name, tokens, "dense", {}, dense, dense_ms, 1.0, 1.0, share, 1.0, 1.0,
                    {"attention_ms": attn_ms}, note=note,
                )
            )  # fmt: skip
            for method, params in specs:
                params = {"dense_steps": 0, **params}  # one forward = one sparse step; warm-up steps are not timed
                # steps of unequal cost (a refresh or a search every `cycle` steps): whole cycles, mean time
                cycle = get_method(method, **params).cycle_steps
                dit_sparse.apply(model, method, **params)
                try:
                    steps = itertools.count()  # a fresh generation: steps 0, 1, ... as in a real run
                    # a cycle method's step 0 is its special step (first search, refresh) and step 1 its first
                    # ordinary one, whose new plan autotunes the kernel: both warm up, then whole cycles are timed
                    ms = time_forward(
                        model, inputs, -(-repeats // cycle) * cycle, max(2, warmup) if cycle > 1 else warmup, steps
                    )
                    dit_sparse.report(model, reset=True)
                    time_forward(model, inputs, cycle, 0, steps)
                    rep = dit_sparse.report(model, reset=True)
                finally:
                    dit_sparse.remove(model)
                density = rep.effective_density
                limit = 1.0 / ((1.0 - share) + share * density)
                forward_ms = statistics.median(ms) if cycle == 1 else statistics.mean(ms)
                speedup = dense / forward_ms
                rows.append(
                    BenchRow(
                        name,
                        shape_name,
                        tokens,
                        method,
                        params,
                        forward_ms,
                        ms,
                        speedup,
                        density,
                        share,
                        limit,
                        speedup / limit,
                        {"sparse_calls": rep.sparse_calls, "calls": rep.calls, "cycle_steps": cycle},
                        note,
                    )
                )
            print(format_table([r for r in rows if r.model == name and r.shape == shape_name]), flush=True)
            del inputs
        if compile != "none":
            time_compiled(model, spec, [r for r in rows if r.model == name], compile, repeats, warmup, device, dtype)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if out is not None:  # after every model: a run cut off keeps what it finished
            write_results(rows, Path(out), command)
    return rows


def time_compiled(
    model: Any,
    spec: ModelSpec,
    rows: list[BenchRow],
    mode: str,
    repeats: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Compile ``model`` (:func:`compile_model`) and time again every row of its eager pass (dense first per shape,
    each method with the same parameters), filling the rows' ``compiled_*`` fields (see the module docstring). A row
    that fails compiled keeps its eager figures and gets ``extra["compiled_error"]`` (one expensive run keeps the rest).
    """
    from torch._dynamo.utils import counters

    import dit_sparse

    call = compile_model(model, spec, mode)
    warmup = max(2, warmup)
    for shape_name in dict.fromkeys(r.shape for r in rows):
        torch._dynamo.reset()  # static shapes: the previous shape's graphs are of no further use
        shape_rows = [r for r in rows if r.shape == shape_name]
        dense_row = shape_rows[0]
        assert dense_row.method == "dense", "each shape's rows start with its dense row"
        inputs, _ = spec.make_inputs(model, spec.shapes[shape_name], device, dtype)
        for row in shape_rows:
            sparse = row.method != "dense"
            row.compile = mode
            if sparse:
                dit_sparse.apply(model, row.method, **row.params)
            try:
                steps = itertools.count()
                first = [round(_warmup_s(model, inputs, steps, call), 3) for _ in range(warmup)]
                graphs = counters["stats"]["unique_graphs"]
                cycle = max(1, int(row.extra.get("cycle_steps", 1)))
                ms = time_forward(model, inputs, -(-repeats // cycle) * cycle, 0, steps, call)
                graphs = counters["stats"]["unique_graphs"] - graphs
            except Exception as exc:  # noqa: BLE001 - reported in the row and the table
                row.extra["compiled_error"] = f"{type(exc).__name__}: {exc}"[:1000]
                print(f"!! {row.model} {row.shape} {row.method} compiled ({mode}) failed: {row.extra['compiled_error']}",
                      flush=True)  # fmt: skip
                continue
            finally:
                if sparse:
                    dit_sparse.remove(model)
            row.compiled_ms_all = ms
            row.compiled_ms = statistics.median(ms) if cycle == 1 else statistics.mean(ms)
            row.extra["compiled_warmup_s"] = first
            row.extra["compiled_graphs_while_timed"] = graphs
        dense = dense_row.compiled_ms
        if dense is None:
            continue
        share = min(1.0, dense_row.extra.get("attention_ms", dense_row.attention_share * dense_row.forward_ms) / dense)
        for row in shape_rows:
            if row.compiled_ms is None:
                continue
            row.compiled_speedup = dense / row.compiled_ms
            row.compiled_speedup_vs_eager = dense_row.forward_ms / row.compiled_ms
            row.compiled_attention_share = share
            row.compiled_amdahl_limit = 1.0 / ((1.0 - share) + share * row.density)
            row.compiled_fraction_of_limit = row.compiled_speedup / row.compiled_amdahl_limit
        print(format_table(shape_rows), flush=True)
        del inputs
