"""Attention-layer speed of each static method against dense SDPA at Wan2.1-1.3B shapes (GPU, one run).

Run on the device (CUDA):

    python benchmarks/methods.py                  # writes benchmarks/results/methods-<date>.{json,md}
    python benchmarks/methods.py --backends triton,flex --repeats 50
    python benchmarks/methods.py --methods draft,adaspa   # only these methods (names or row labels)
    python benchmarks/methods.py --dry-run        # CPU smoke test of this script (tiny shape, reference backend)

Shapes: Wan2.1-1.3B at 81 frames, B=1, H=12, D=128, bf16; 480p = 21×30×52 latent grid (32,760 tokens), 720p =
21×45×80 (75,600 tokens). q/k/v are handed as the BHND view of BNHD memory, as Diffusers does.
For every method (defaults; for ``svdit`` every head in one mode, plus a mixed layer exercising head fusion with a
multi-diagonal group, a plain group and skipped heads) it times ``method.attend`` with the block-sparse kernel
(plan built and cached before timing; the token permutation included), and reports the plan density, the median
time over ``repeats`` (CUDA events, warm-up excluded), the speedup over dense SDPA (the backend torch picks) of
the same run, the one-time plan build time, and the relative L2 error against dense attention. ``rettention``'s
sparse and refresh steps are timed separately, plus their mean over its refresh cycle (``RETTENTION_NOTE``).
Dynamic methods (``draft``, ``adaspa``) are timed with their estimation cost, each call being the next denoising
step (``DYNAMIC_NOTE``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dit_sparse.files import atomic_write_json, environment
from dit_sparse.kernels import block_sparse_attention
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import get_method
from dit_sparse.methods.svdit import save_config
from dit_sparse.state import StepContext
from dit_sparse.timing import Timer, median_ms

SHAPES = {"wan2.1-1.3b-480p": (21, 30, 52), "wan2.1-1.3b-720p": (21, 45, 80)}
DRY_RUN_SHAPES = {"dry-run": (3, 4, 6)}
HEADS, HEAD_DIM = 12, 128
MIXED = ["dense", "diagonal", "diagonal", "multi_diagonal", "multi_diagonal", "vertical_stripe",
         "vertical_stripe", "diagonal", "multi_diagonal", "skip", "vertical_stripe", "diagonal"]  # fmt: skip


def methods_to_run(tmp: Path, heads: int, block: int | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Label -> (method name, params). svdit configs are written to ``tmp``."""
    runs: dict[str, tuple[str, dict[str, Any]]] = {"window": ("window", {}), "radial": ("radial", {})}
    mixed = (MIXED * (heads // len(MIXED) + 1))[:heads]
    for label, modes in [
        ("svdit:diagonal", ["diagonal"] * heads),
        ("svdit:multi_diagonal", ["multi_diagonal"] * heads),
        ("svdit:vertical_stripe", ["vertical_stripe"] * heads),
        ("svdit:mixed", mixed),
    ]:
        path = tmp / f"{label.replace(':', '-')}.json"
        params = {} if block is None else {"block_size": block}
        save_config({"format": "dit-sparse/svdit", "version": 1, "heads": heads, "layers": {"0": modes},
                     "params": params}, path)  # fmt: skip
        runs[label] = ("svdit", {"config": str(path)})
    # Re-ttention's steps differ in cost: its sparse step (refresh far away) and its refresh step (every step)
    runs[RETTENTION_SPARSE] = ("rettention", {"refresh_interval": 10**6})
    runs[RETTENTION_REFRESH] = ("rettention", {"refresh_interval": 1})
    # dynamic: draft re-plans every call; adaspa reuses its plan between searches, so its three kinds of step
    runs["draft"] = ("draft", {})
    runs["adaspa"] = ("adaspa", {})
    runs[ADASPA_SEARCH] = ("adaspa", {"search_interval": 1})
    runs[ADASPA_FIRST_SEARCH] = ("adaspa", {})
    if block is not None:
        for name, params in runs.values():
            if name == "radial":
                params.update(block_size=block, min_window=block)
            elif name == "window":
                params.update(block_size=block, tile=(1, 2, block // 2))
            elif name == "rettention":
                params.update(block_size=block)
            elif name == "draft":
                params.update(block_size=block, pool=(2, block // 2))
            elif name == "adaspa":
                params.update(block_size=block)
    return runs


RETTENTION_SPARSE, RETTENTION_REFRESH = "rettention:sparse-step", "rettention:refresh-step"
RETTENTION_NOTE = (
    "rettention: its sparse step (ultra-sparse kernel + the cached correction) and its refresh step (dense + sparse "
    "kernels with LSE, density 1 + sparse) are timed separately, each call being the next denoising step; "
    "`rettention:cycle-5` is their mean over the default cycle (1 refresh + 4 sparse steps). Its rel L2 is measured "
    "on the q/k/v of the refresh, where the correction restores dense attention by construction: its real error "
    "shows only across denoising steps (`dit-sparse eval`)."
)


ADASPA_SEARCH, ADASPA_FIRST_SEARCH = "adaspa:search-step", "adaspa:first-search-step"
DYNAMIC_NOTE = (
    "draft and adaspa: each timed call is the next denoising step, estimation included. draft builds a new plan "
    "every call. `adaspa` reuses its plan (a step between searches); `adaspa:search-step` scores every block with "
    "the cached LSE and runs the new plan (a later search step); `adaspa:first-search-step` runs dense attention "
    "(density 1) then the scoring pass (a layer's first search step); `adaspa:schedule-50` is their mean over the "
    "paper's 40 sparse steps of 50 (1 first search, 1 later search, 38 reuses)."
)


def _fresh_cache(fn, ctx: StepContext):
    """Call ``fn`` with an empty per-layer cache (a dynamic method's first search step, every call)."""
    ctx.cache.clear()
    return fn()


def adaspa_schedule_row(rows: list[dict[str, Any]], sparse_steps: int = 40) -> dict[str, Any] | None:
    """AdaSpa's mean step over the paper's schedule (of 50 steps, 40 sparse: a first search, a later search, the
    rest reusing the plan), from the shape's three adaspa rows; None unless all are there."""
    found = {r["method"]: r for r in rows}
    reuse, search, first = found.get("adaspa"), found.get(ADASPA_SEARCH), found.get(ADASPA_FIRST_SEARCH)
    if reuse is None or search is None or first is None:
        return None
    mix = lambda key: (first[key] + search[key] + (sparse_steps - 2) * reuse[key]) / sparse_steps  # noqa: E731
    dense_ms = reuse["ms"] * reuse["speedup"]
    row = {key: value for key, value in reuse.items() if key != "launches"}
    return dict(row, method="adaspa:schedule-50", density=mix("density"), ms=mix("ms"), speedup=dense_ms / mix("ms"))


def _next_step(fn, ctx: StepContext):
    """Call ``fn`` as the next denoising step of ``ctx``."""
    ctx.step += 1
    return fn()


def rettention_cycle_row(rows: list[dict[str, Any]], cycle: int = 5) -> dict[str, Any] | None:
    """Re-ttention's mean step over its default refresh cycle (1 refresh step, ``cycle - 1`` sparse steps), from the
    shape's sparse-step and refresh-step rows; None unless both are there."""
    found = {r["method"]: r for r in rows}
    sparse, refresh = found.get(RETTENTION_SPARSE), found.get(RETTENTION_REFRESH)
    if sparse is None or refresh is None:
        return None
    mix = lambda key: (refresh[key] + (cycle - 1) * sparse[key]) / cycle  # noqa: E731
    dense_ms = refresh["ms"] * refresh["speedup"]
    row = {key: value for key, value in sparse.items() if key != "launches"}
    return dict(row, method=f"rettention:cycle-{cycle}", density=mix("density"), ms=mix("ms"),
                speedup=dense_ms / mix("ms"))  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if not args.dry_run else "cpu")
    dtype = torch.bfloat16 if not args.dry_run else torch.float32
    shapes = DRY_RUN_SHAPES if args.dry_run else SHAPES
    heads, head_dim = (HEADS, 16) if args.dry_run else (HEADS, HEAD_DIM)
    block = 8 if args.dry_run else None
    backends = ["reference"] if args.dry_run else args.backends.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="dit-sparse-methods-"))  # svdit configs of this run (scratch)
    results: dict[str, Any] = {
        **environment(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "batch": 1,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": str(dtype),
        "repeats": args.repeats,
        "rows": [],
    }
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape_name, (t, h, w) in shapes.items():
        layout = TokenLayout(t, h, w)
        n = layout.seq_len
        qkv = [torch.randn(1, n, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(3)]
        q, k, v = qkv
        dense_ms = median_ms(partial(F.scaled_dot_product_attention, q, k, v), device, args.repeats, args.warmup)
        ref = F.scaled_dot_product_attention(q, k, v).float()
        results["rows"].append(dict(shape=shape_name, tokens=n, method="dense SDPA", backend="sdpa", density=1.0,
                                    ms=dense_ms, speedup=1.0, plan_ms=0.0, rel_l2=0.0))  # fmt: skip
        print(f"{shape_name}: N={n} dense SDPA {dense_ms:.3f} ms", flush=True)
        for label, (name, params) in methods_to_run(tmp, heads, block).items():
            if args.methods and not {label, name} & set(args.methods.split(",")):
                continue
            for backend in backends:
                method = get_method(name, **params)
                ctx = StepContext(40, None, "cond", "blocks.0.attn1", 0, layout)
                plans: list = []

                def kernel(q_, k_, v_, plan, return_lse=False, aux_work=False, backend=backend, plans=plans):
                    plans.append((plan, q_.shape[1]))
                    res = block_sparse_attention(q_, k_, v_, plan, return_lse=return_lse, backend=backend)
                    return res if return_lse else (res, None)

                timer, start = Timer(), Timer.start(device)
                out = method.attend(q, k, v, layout, ctx, kernel)  # builds and caches the plan(s)
                timer.stop(start)
                plan_ms = timer.total()
                call = partial(method.attend, q, k, v, layout, ctx, kernel)
                if name == "rettention":  # its cost depends on the step: measure and time the steps after the first
                    call = partial(_next_step, call, ctx)
                    plans.clear()
                    out = call()
                elif method.dynamic:  # estimation included: measure and time the steps after the first
                    call = partial(_fresh_cache if label == ADASPA_FIRST_SEARCH else _next_step, call, ctx)
                    plans.clear()
                    out = call()
                density = sum(p.density() * hp for p, hp in plans) / heads  # skipped heads count 0
                launches = len(plans)
                rel = float((out.float() - ref).norm() / ref.norm())
                ms = median_ms(call, device, args.repeats, args.warmup)
                row = dict(shape=shape_name, tokens=n, method=label, backend=backend, density=density, ms=ms,
                           speedup=dense_ms / ms, plan_ms=plan_ms, rel_l2=rel, launches=launches)  # fmt: skip
                results["rows"].append(row)
                print(f"  {label:<22} {backend:<9} density {density:.3f}  {ms:8.3f} ms  x{dense_ms / ms:5.2f}  "
                      f"launches {launches}  rel_l2 {rel:.3f}", flush=True)  # fmt: skip
        for backend in backends:
            row = rettention_cycle_row([r for r in results["rows"] if r["shape"] == shape_name and
                                        r["backend"] == backend])  # fmt: skip
            row2 = adaspa_schedule_row([r for r in results["rows"] if r["shape"] == shape_name and
                                        r["backend"] == backend])  # fmt: skip
            if row2 is not None:
                results["rows"].append(row2)
                print(f"  {row2['method']:<22} {backend:<9} density {row2['density']:.3f}  {row2['ms']:8.3f} ms  "
                      f"x{row2['speedup']:5.2f}  (mean sparse step of the paper's schedule)", flush=True)  # fmt: skip
            if row is not None:
                results["rows"].append(row)
                print(f"  {row['method']:<22} {backend:<9} density {row['density']:.3f}  {row['ms']:8.3f} ms  "
                      f"x{row['speedup']:5.2f}  (mean step of its refresh cycle)", flush=True)  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Sparse-attention methods vs dense SDPA (one attention layer) — {results['date']}",
        "",
        f"- device: {results['device']}; torch {results['torch']}; triton {results['triton']}; "
        f"diffusers {results['diffusers']}; python {results['python']}",
        f"- B={results['batch']}, H={results['heads']}, D={results['head_dim']}, {results['dtype']}, median of "
        f"{results['repeats']} (CUDA events, warm-up excluded); plan built once before timing",
        f"- command: `{results['command']}`",
        "",
        "| shape | tokens | method | backend | density | ms | speedup vs SDPA | launches | plan build ms | rel L2 |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['method']} | {r['backend']} | {r['density']:.3f} | {r['ms']:.3f} "
            f"| {r['speedup']:.2f} | {r.get('launches', '')} | {r['plan_ms']:.1f} | {r['rel_l2']:.3f} |"
        )
    if any(r["method"].startswith("rettention") for r in results["rows"]):
        lines += ["", RETTENTION_NOTE]
    if any(r["method"] in ("draft", "adaspa") for r in results["rows"]):
        lines += ["", DYNAMIC_NOTE]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="triton", help="comma-separated kernel backends (triton, flex)")
    ap.add_argument("--methods", default="", help="comma-separated method names or row labels (default: all)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU run of this script (no GPU numbers)")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/methods.py needs CUDA (use --dry-run to smoke-test it on CPU)")
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"methods-{'dry-run-' if args.dry_run else ''}{dt.date.today().isoformat()}"
    atomic_write_json(stem.with_suffix(".json"), results)
    write_markdown(results, stem.with_suffix(".md"))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
