"""CUDA graphs with dit_sparse: ``torch.compile(transformer, mode="reduce-overhead")`` against eager and the default
compile mode, per method, with the per-step state (dense warm-up step, then sparse steps) inside the timed run.

    python benchmarks/cudagraphs.py                         # GPU: Wan2.1-1.3B, 480p, 10 of 30 blocks, bf16
    python benchmarks/cudagraphs.py --smoke                 # CPU: tiny Wan, checks the script (no CUDA graphs)

dit_sparse's ops (``dit_sparse::attend``, ``begin_forward``, ``end_forward``) are tagged ``cudagraph_unsafe``: with
Inductor's graph partitioning (``torch._inductor.config.graph_partition``, set here) the code between them is
captured in CUDA graphs and replayed, while the ops themselves run eagerly at every call, so routing and per-step
state (dense warm-up, dynamic plans) stay live. Per method (``none`` is the model's own attention): one eager
generation of ``--steps`` steps (``dense_steps=1``: the first step dense, the rest sparse), then per compile mode
two generations, the second timed; its outputs are compared with the eager ones (relative L2 per step). Inductor's
CUDA-graph counters are recorded (``cudagraph_skips``: graphs it refused to capture).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from typing import Any

import torch

import dit_sparse
from dit_sparse.bench.models import MODELS, build_model
from dit_sparse.files import atomic_write_json, atomic_write_text, environment
from dit_sparse.methods import parse_method_spec
from dit_sparse.timing import Timer

MODES = ("default", "reduce-overhead")


def generation(call: Any, model: Any, inputs: dict[str, Any], steps: int) -> tuple[list[torch.Tensor], list[float]]:
    """Outputs and milliseconds of ``steps`` forwards at falling timesteps (one CFG pass per step)."""
    outs, ms = [], []
    device = inputs["hidden_states"].device
    with torch.inference_mode():
        for i in range(steps):
            t = torch.full_like(inputs["timestep"], 1000.0 * (1 - i / steps))
            with model.cache_context("cond", step_index=i):
                timer = Timer()
                start = Timer.start(device)
                out = call(**{**inputs, "timestep": t})[0]
                timer.stop(start)
            outs.append(out.float().clone())
            ms.append(timer.total())
    return outs, ms


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run_method(model: Any, inputs: dict[str, Any], spec: str, steps: int, modes: list[str]) -> dict[str, Any]:
    name, params = ("none", {}) if spec == "none" else parse_method_spec(spec)
    policy = {"dense_steps": 1, "min_seq_len": 0} if name != "none" else {}

    def fresh() -> None:
        dit_sparse.remove(model)
        torch._dynamo.reset()
        if name != "none":
            dit_sparse.apply(model, name, **policy, **params)

    fresh()
    ref, eager_ms = generation(model, model, inputs, steps)
    row: dict[str, Any] = {"method": spec, "eager_ms": eager_ms, "modes": {}}
    if name != "none":
        row["density"] = float(dit_sparse.report(model, reset=True).effective_density)
    for mode in modes:
        fresh()
        counters = torch._dynamo.utils.counters
        counters.clear()
        compiled = torch.compile(model, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)
        try:
            generation(compiled, model, inputs, steps)  # compiles and records
            outs, ms = generation(compiled, model, inputs, steps)
        except Exception as e:  # noqa: BLE001 - a mode that fails is a results row with its reason
            row["modes"][mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        inductor = dict(counters["inductor"])
        row["modes"][mode] = {
            "ms": ms,
            "max_rel_l2": max(rel_l2(o, r) for o, r in zip(outs, ref, strict=True)),
            "cudagraph_skips": int(inductor.get("cudagraph_skips", 0)),
            "cudagraph_recorded_non_static_inputs": int(inductor.get("cudagraph_recorded_non_static_inputs", 0)),
            "graph_breaks": sum(counters["graph_break"].values()),
        }
    dit_sparse.remove(model)
    return row


def sparse_ms(ms: list[float]) -> float:
    """Median of the sparse steps' forwards (every step after the first)."""
    tail = sorted(ms[1:]) or ms
    return tail[len(tail) // 2]


def table(rows: list[dict[str, Any]], modes: list[str]) -> list[str]:
    dense = next((r for r in rows if r["method"] == "none"), None)
    ref = sparse_ms(dense["eager_ms"]) if dense else None
    head = "| method | density | eager ms | " + " | ".join(
        f"{m} ms | {m} × eager dense | {m} rel L2 | {m} CUDA-graph skips" for m in modes
    )
    lines = [head + " |", "| --- | ---: | ---: | " + " | ".join("---: | ---: | ---: | ---:" for _ in modes) + " |"]
    for r in rows:
        cells = [r["method"], f"{r['density']:.3f}" if "density" in r else "", f"{sparse_ms(r['eager_ms']):.1f}"]
        for m in modes:
            got = r["modes"].get(m, {})
            if "error" in got:
                cells += [f"FAILED: {got['error']}", "", "", ""]
                continue
            t = sparse_ms(got["ms"])
            cells += [
                f"{t:.1f}",
                f"{ref / t:.2f}x" if ref else "",
                f"{got['max_rel_l2']:.2e}",
                str(got["cudagraph_skips"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="wan2.1-1.3b", choices=[m for m in MODELS if MODELS[m].cls_name.startswith("Wan")]
    )
    ap.add_argument("--shape", default="480p")
    ap.add_argument("--layers", type=int, default=10, help="blocks built (compile time grows with them; default 10)")
    ap.add_argument("--methods", nargs="+", default=["none", "radial", "draft"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny Wan on the CPU: checks the script end to end")
    ap.add_argument("--out", default=None, help="results prefix (default benchmarks/results/cudagraphs-<date>)")
    args = ap.parse_args()
    for spec in args.methods:
        if spec != "none":
            parse_method_spec(spec)
    torch._inductor.config.graph_partition = True
    out = (
        args.out or f"benchmarks/results/cudagraphs-{datetime.date.today().isoformat()}{'-smoke' if args.smoke else ''}"
    )
    if args.smoke:
        from diffusers import WanTransformer3DModel

        from dit_sparse.eval.testing import TINY_WAN_CONFIG

        torch.manual_seed(0)
        model = WanTransformer3DModel(**TINY_WAN_CONFIG).eval()
        inputs = {"hidden_states": torch.randn(1, 16, 4, 16, 32), "timestep": torch.full((1,), 999.0),
                  "encoder_hidden_states": torch.randn(1, 16, 32), "return_dict": False}  # fmt: skip
        what = "tiny Wan, 4 x 8 x 16 tokens (CPU, fp32)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("cudagraphs.py times CUDA graphs and needs an NVIDIA GPU; use --smoke on the CPU")
        spec = MODELS[args.model]
        spec = type(spec)(**{**spec.__dict__, "subset": {**spec.subset, "num_layers": args.layers}})
        device, dtype = torch.device("cuda"), torch.bfloat16
        model = build_model(spec, device, dtype)
        inputs, seq = spec.make_inputs(model, spec.shapes[args.shape], device, dtype)
        what = f"{args.model} {args.shape} ({seq} tokens), {args.layers} blocks, bf16, random weights"
    rows = []
    for spec_text in args.methods:
        rows.append(run_method(model, inputs, spec_text, args.steps, args.modes))
        print(rows[-1], flush=True)
    result = {"command": "python " + shlex.join(sys.argv), "environment": environment(), "model": what,
              "steps": args.steps, "rows": rows}  # fmt: skip
    atomic_write_json(out + ".json", result)
    env = result["environment"]
    md = [
        f"# CUDA graphs: torch.compile modes per method ({what})",
        "",
        f"`{result['command']}` on {env.get('device')}, torch {env.get('torch')}, {env.get('date')}. "
        f"{args.steps} steps per generation, the first dense (`dense_steps=1`); ms: median forward of the sparse "
        "steps of the second compiled generation (after recording); rel L2: largest over the steps against eager; "
        "Inductor graph partitioning on (dit_sparse's ops run eagerly between CUDA graphs).",
        "",
        *table(rows, args.modes),
    ]
    atomic_write_text(out + ".md", "\n".join(md) + "\n")
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
