"""Sparse attention on 1 and 2 GPUs (Ulysses context parallelism, issue 21): transformer forward and whole generation.

    torchrun --nproc-per-node 2 benchmarks/parallel.py                      # nvidia-h200-x2: Wan2.1-1.3B + 14B, 720p
    torchrun --nproc-per-node 2 benchmarks/parallel.py --models wan2.1-1.3b --methods none radial adaspa --steps 10
    python benchmarks/parallel.py --smoke                                    # CPU, 2 gloo processes, tiny Wan

Random bf16 weights (``dit_sparse.bench.models``; Wan2.1-14B times its 10-block subset, as ``benchmarks/e2e.py``).
Per model and method (``none`` = the model's own attention): rank 0 alone times one forward (median of
``--repeats``) and one whole text-free CFG generation of ``--steps`` steps (random prompt embeddings, latent output);
then every rank enables Ulysses context parallelism (:func:`dit_sparse.parallel.enable_context_parallel`) and the
same is timed on all GPUs (any registered method: adaspa's head-adaptive rule all-gathers its per-head recalls
over the ranks at each search), and its forward output is compared with the 1-GPU one (relative L2; same seeded
weights and inputs on every rank). Whole generation = the denoising loop with CFG, latent output (no VAE). Writes ``benchmarks/results/parallel-<date>[-smoke].json`` and ``.md`` (rank 0; refuses to
overwrite). ``--smoke``: CPU, gloo, a 2-head Wan transformer at 256 tokens (Diffusers needs one accelerator to be
reported on a CPU-only torch: the script reports one).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dit_sparse
from dit_sparse.bench.models import MODELS, ModelSpec, _wan_inputs, build_model
from dit_sparse.eval.testing import TINY_WAN_CONFIG
from dit_sparse.files import atomic_write_json, atomic_write_text, environment
from dit_sparse.parallel import enable_context_parallel
from dit_sparse.timing import median_ms

WAN_MODELS = ("wan2.1-1.3b", "wan2.1-14b")
SMOKE = ModelSpec(
    "WanTransformer3DModel",
    TINY_WAN_CONFIG,
    {"smoke": (13, 128, 128)},
    _wan_inputs,
    note="tiny random Wan (2 heads, 2 blocks), 4x8x8 = 256 video tokens",
)
GROUP_TIMEOUT = datetime.timedelta(hours=1)  # the other ranks wait while rank 0 times the 1-GPU runs
SMOKE_PARAMS = {"block_size": 16, "min_seq_len": 0, "dense_steps": 0}  # so that 256 tokens run sparse


def _generate(model: Any, shape: tuple[int, int, int], steps: int, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=model,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )  # fmt: skip
    text_dim = model.config.text_dim
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, 512, text_dim, generator=g).to(device, dtype) for _ in range(2)]
    frames, height, width = shape

    def run() -> None:
        pipe(
            prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=height, width=width,
            num_frames=frames, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    return run


def _time(model: Any, spec: ModelSpec, shape_name: str, method: str, params: dict, args: Any, device, dtype) -> dict:
    """Forward and generation milliseconds of ``model`` with ``method`` applied (``none``: its own attention), and
    the forward's output (the same seeded inputs on every rank)."""
    if method != "none":
        dit_sparse.apply(model, method, **params)
    torch.manual_seed(0)
    inputs, seq_len = spec.make_inputs(model, spec.shapes[shape_name], device, dtype)
    with torch.no_grad():
        forward_ms = median_ms(lambda: model(**inputs), device, repeats=args.repeats, warmup=1)
        output = model(**inputs)[0].float().cpu()
    density = dit_sparse.report(model, reset=True).effective_density if method != "none" else 1.0
    generate_ms = median_ms(_generate(model, spec.shapes[shape_name], args.steps, device, dtype), device, 1, 0)
    if method != "none":
        dit_sparse.remove(model)
    row = {"tokens": seq_len, "forward_ms": forward_ms, "generate_ms": generate_ms, "density": density}
    return {**row, "output": output}


def _bench(args: Any, rank: int, world: int, device: torch.device) -> list[dict]:
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows = []
    for name in args.models:
        spec = SMOKE if args.smoke else MODELS[name]
        for shape_name in ["smoke"] if args.smoke else args.shapes:
            torch.manual_seed(0)  # the same random weights on every rank
            model = build_model(spec, device, dtype)
            single: dict[str, torch.Tensor] = {}  # rank 0's 1-GPU forward output per method
            for gpus in (1, world):
                if gpus > 1:
                    dist.barrier()
                    enable_context_parallel(model, world)
                if gpus == 1 and rank != 0:
                    continue
                for method in args.methods:
                    params = SMOKE_PARAMS if args.smoke and method != "none" else {}
                    row = _time(model, spec, shape_name, method, params, args, device, dtype)
                    output = row.pop("output")
                    if gpus == 1:
                        single[method] = output
                    else:  # relative L2 distance of the context-parallel forward output to the 1-GPU one
                        ref = single.get(method)
                        row["rel_l2_vs_1gpu"] = None if ref is None else float((output - ref).norm() / ref.norm())
                    rows.append({"model": name, "shape": shape_name, "method": method, "gpus": gpus, **row})
                    if rank == 0:
                        print(rows[-1], flush=True)
            del model
            dist.barrier()
    return rows


def _markdown(rows: list[dict], args: Any) -> str:
    one = {(r["model"], r["shape"], r["method"]): r for r in rows if r["gpus"] == 1}
    lines = [
        f"# Sparse attention under Ulysses context parallelism ({datetime.date.today()})",
        "",
        f"`{' '.join(sys.argv)}`; {args.steps}-step CFG generations (latent output, no VAE). Speedup: against the "
        "model's own attention on 1 GPU; scaling: against the same method on 1 GPU; error: relative L2 of the forward "
        "output against the same method on 1 GPU.",
        "",
        "| model | shape | tokens | method | GPUs | density | forward ms | generation s | speedup (fwd / gen) "
        "| scaling (fwd / gen) | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ratio(ref: dict | None, r: dict) -> str:
        if ref is None:
            return "-"
        return f"{ref['forward_ms'] / r['forward_ms']:.2f}x / {ref['generate_ms'] / r['generate_ms']:.2f}x"

    for r in rows:
        base, same = one.get((r["model"], r["shape"], "none")), one.get((r["model"], r["shape"], r["method"]))
        err = r.get("rel_l2_vs_1gpu")
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['tokens']} | {r['method']} | {r['gpus']} | {r['density']:.3f} | "
            f"{r['forward_ms']:.1f} | {r['generate_ms'] / 1000:.2f} | {ratio(base, r)} | "
            f"{ratio(same, r) if r['gpus'] > 1 else '-'} | {'-' if err is None else f'{err:.2e}'} |"
        )
    return "\n".join(lines) + "\n"


def _worker(rank: int, args: Any) -> None:
    """One rank: join the group (gloo on CPU for --smoke, else NCCL on the rank's GPU), time, rank 0 writes."""
    if args.smoke:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=GROUP_TIMEOUT)
        torch.accelerator.device_count = lambda: 1  # Diffusers divides by it (see the module docstring)
        device = torch.device("cpu")
    else:
        rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", device_id=device, timeout=GROUP_TIMEOUT)
    try:
        rows = _bench(args, rank, dist.get_world_size(), device)
        if rank == 0:
            atomic_write_json(args.out.with_suffix(".json"), {"environment": environment(), "rows": rows})
            atomic_write_text(args.out.with_suffix(".md"), _markdown(rows, args))
            print(f"wrote {args.out.with_suffix('.json')} and .md")
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(WAN_MODELS), choices=WAN_MODELS)
    ap.add_argument("--shapes", nargs="+", default=["720p"], choices=["480p", "720p"])
    ap.add_argument("--methods", nargs="+", default=["none", "radial"], help="'none' = the model's own attention")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the timed generation (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="forward repeats after one warm-up (default 3)")
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 gloo processes, tiny Wan (see above)")
    ap.add_argument("--port", type=int, default=29533, help="--smoke: the rendezvous port (default 29533)")
    ap.add_argument("--out", type=Path, default=None, help="results prefix (default benchmarks/results/parallel-...)")
    ap.add_argument("--force", action="store_true", help="overwrite existing results")
    args = ap.parse_args()
    if "none" not in args.methods:
        args.methods.insert(0, "none")  # the reference of the speedups
    if args.smoke:
        args.models, args.steps, args.repeats = ["wan-tiny"], min(args.steps, 2), 1
    suffix = "-smoke" if args.smoke else ""
    args.out = args.out or Path(__file__).parent / "results" / f"parallel-{datetime.date.today()}{suffix}"
    for path in (args.out.with_suffix(".json"), args.out.with_suffix(".md")):
        if path.exists() and not args.force:
            sys.exit(f"{path} exists; pass --force to overwrite it or --out another prefix")
    if args.smoke:
        mp.spawn(_worker, args=(args,), nprocs=2)
    elif "LOCAL_RANK" not in os.environ:
        sys.exit("run under torchrun: torchrun --nproc-per-node 2 benchmarks/parallel.py ... (or --smoke on CPU)")
    else:
        _worker(0, args)


if __name__ == "__main__":
    main()
