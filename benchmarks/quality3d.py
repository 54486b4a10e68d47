"""Quality of sparse attention on the embedded tiny 3D model: IoU and Chamfer distance against dense.

    python benchmarks/quality3d.py                       # 50 seeded prompts, the methods below, CPU (~ minutes)
    python benchmarks/quality3d.py --device cuda --methods window3d ssa

Per method: the same prompts, seeds, steps and guidance as the dense run; per shape the occupancy IoU (SDF < 0) and
the symmetric Chamfer distance between occupied cells (in units of the volume's half-extent) against the dense
shape, and the attention density the method reached (``dit_sparse.report``). ``min_seq_len`` is 0 for every method:
the tiny model attends 512 tokens (8³), under the package default of 1024. At the default 64-token blocks 512 tokens
are only 8 blocks, so the rows with 8-token blocks (2³ cells) are the ones that are really sparse.
Writes benchmarks/results/quality3d-<date>.json and .md (with ``dit_sparse.files.environment()``).
"""

import argparse
import datetime
import shlex
import sys
import time

import torch

import dit_sparse
from dit_sparse.files import atomic_write_json, atomic_write_text, environment
from dit_sparse.methods import parse_method_spec
from dit_sparse.model3d import generate, metrics, model, shapes

METHODS = [
    "window3d",
    "ssa",
    "window3d:block_size=8;cell=2,2,2;window=2,2,2",
    "window3d:block_size=8;cell=2,2,2;window=1,1,1",
    "ssa:block_size=8;cell=2,2,2;topk=8;window=1,1,1",
    "ssa:block_size=8;cell=2,2,2;topk=4;window=1,1,1",
    "window:block_size=8;tile=2,2,2;window=1,1,1",
    "draft:block_size=8;pool=2,4;sparsity=0.5",
]


def run(net, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int) -> torch.Tensor:
    """SDF volumes for every (prompt, seed), ``batch`` prompts per sampling call."""
    out = []
    for i in range(0, len(prompts), batch):
        out.append(generate.sample(net, prompts[i : i + batch], seeds[i], steps, guidance))
    return torch.cat(out)


def row_backend(backend: str, params: dict, net: torch.nn.Module) -> str:
    """The kernel backend of one row: ``--backend``, except that ``auto`` on CUDA becomes ``reference`` (exact, and
    cheap at 512 tokens) for the rows with blocks under 16 tokens, which the Triton kernel does not take."""
    on_cuda = next(net.parameters()).is_cuda
    return "reference" if backend == "auto" and on_cuda and params.get("block_size", 64) < 16 else backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS, help="method specs (NAME:key=value;key=value)")
    ap.add_argument("--prompts", type=int, default=50, help="seeded prompts from the grammar (default 50)")
    ap.add_argument("--seed", type=int, default=2026, help="seed of the prompt list (default 2026)")
    ap.add_argument("--steps", type=int, default=generate.STEPS)
    ap.add_argument("--guidance", type=float, default=generate.GUIDANCE)
    ap.add_argument("--batch", type=int, default=10, help="prompts per sampling call (default 10)")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded assets/tiny-3d)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=None, help="results prefix (default benchmarks/results/quality3d-<date>)")
    args = ap.parse_args()
    specs = [parse_method_spec(s) for s in args.methods]  # bad names / values fail before any work
    out = args.out or f"benchmarks/results/quality3d-{datetime.date.today().isoformat()}"
    net = model.load(args.model, device=args.device)
    prompts = [s.caption for s in shapes.sample(args.seed, args.prompts)]
    seeds = [args.seed + i for i in range(len(prompts))]  # one seed per sampling call: its first prompt's
    t0 = time.perf_counter()
    dense = run(net, prompts, seeds, args.steps, args.guidance, args.batch)
    rows = [{"method": "dense", "spec": "dense", "iou": 1.0, "iou_min": 1.0, "chamfer": 0.0, "chamfer_max": 0.0,
             "density": 1.0, "seconds": round(time.perf_counter() - t0, 2)}]  # fmt: skip
    truth_iou = metrics.iou(dense, shapes.sdf([shapes.parse(p) for p in prompts]).to(dense.device))
    print(f"dense: {rows[0]['seconds']} s; IoU against the prompts' procedural shapes {truth_iou.mean():.3f}")
    for spec, (name, params) in zip(args.methods, specs, strict=True):
        backend = row_backend(args.backend, params, net)
        generate.make_sparse(net, name, params, backend=backend)
        t0 = time.perf_counter()
        vols = run(net, prompts, seeds, args.steps, args.guidance, args.batch)
        seconds = time.perf_counter() - t0
        rep = dit_sparse.report(net)
        dit_sparse.remove(net)
        iou, cd = metrics.iou(vols, dense), metrics.chamfer(vols, dense)
        rows.append({
            "method": name, "spec": spec, "iou": round(float(iou.mean()), 4), "iou_min": round(float(iou.min()), 4),
            "chamfer": round(float(cd.mean()), 5), "chamfer_max": round(float(cd.max()), 5),
            "density": round(rep.effective_density, 4), "sparse_calls": rep.sparse_calls,
            "dense_calls": rep.dense_calls, "seconds": round(seconds, 2), "backend": backend,
        })  # fmt: skip
        print(rows[-1])
    result = {
        "command": "python " + shlex.join(sys.argv),
        "environment": environment(),
        "prompts": len(prompts),
        "prompt_seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "model": str(args.model or model.asset_path()),
        "dense_iou_vs_procedural": round(float(truth_iou.mean()), 4),
        "rows": rows,
    }
    atomic_write_json(out + ".json", result)
    lines = [
        f"# Tiny 3D model: quality against dense ({len(prompts)} prompts, {args.steps} steps, guidance "
        f"{args.guidance})",
        "",
        f"`{result['command']}` on {result['environment'].get('device')}, {result['environment'].get('date')}. "
        f"Dense IoU against the prompts' procedural shapes: {result['dense_iou_vs_procedural']}.",
        "",
        "| method | density | IoU mean | IoU min | Chamfer mean | Chamfer max | seconds | backend |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| `{r['spec']}` | {r['density']:.3f} | {r['iou']:.3f} | {r['iou_min']:.3f} | {r['chamfer']:.4f} | "
            f"{r['chamfer_max']:.4f} | {r['seconds']} | {r.get('backend', '')} |"
            for r in rows
        ),
    ]
    atomic_write_text(out + ".md", "\n".join(lines) + "\n")
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
