"""Kernel benchmark: the Triton block-sparse kernel against dense SDPA and FlexAttention on identical plans (GPU).

Run on the device (CUDA):

    python benchmarks/kernel_speed.py                       # full table, writes benchmarks/results/kernels-<date>.{json,md}
    python benchmarks/kernel_speed.py --check               # GPU correctness suite on small shapes first, then the table
    python benchmarks/kernel_speed.py --shapes 12x32760x128 --densities 1,0.25,0.05

For every shape (B=1, bf16, q/k/v handed as the BHND view of BNHD memory, as Diffusers does) and every plan (random
block plans at the given densities, every row keeping its diagonal block, and a radial-like plan whose band narrows
with frame distance) it reports the median time (``triton.testing.do_bench``, warm-up and autotuning excluded; the
timings compared with each other are taken in turn, ``--rounds`` times, and the median kept),
the effective TFLOP/s ``4·B·H·N²·D·density / time`` (density = the plan's exact computed fraction), and the ratios
to dense SDPA (the backend torch picks; cuDNN forced too) and to compiled FlexAttention on the same BlockMask.
With ``precision="fp8"`` (Hopper and newer; ``--no-fp8`` skips it) each plan also gets the fp8 kernel's time (its
quantization pre-pass included; the pre-pass alone is reported per shape), its effective TFLOP/s, its speed-up over
the bf16 kernel and cuDNN, and its relative error against the bf16 kernel; the dense ``sageattention`` package, when
importable, is timed beside cuDNN on the same q/k/v. Also: the one-time plan preprocessing cost, and the cost of the token permutation: the same plan with the methods'
permutations (position-major, draft's 1x8x16 tiles) and a random one, against the plan without one, both through the
autotuned pick and through each strategy (rows gathered in the kernel; K and V gathered into copies, then TMA).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dit_sparse.files import environment
from dit_sparse.kernels import AttentionCall, block_sparse_attention
from dit_sparse.layout import TokenLayout
from dit_sparse.plan import HEAD_SKIP, BlockPlan
from dit_sparse.tune import random_plan as tune_random_plan

# (heads, seq_len, head_dim, latent grid): the grid shapes the radial-like plan and the methods' permutations
# (Wan 2.1 480p / 720p 81 frames: 21x30x52, 21x45x80; CogVideoX 480x720 49 frames: 13x30x45)
SHAPES = {
    "12x32760x128": (12, 32760, 128, (21, 30, 52)),
    "24x75600x128": (24, 75600, 128, (21, 45, 80)),
    "48x17550x64": (48, 17550, 64, (13, 30, 45)),
}
DRY_RUN_SHAPES = {"2x700x64": (2, 700, 64, (7, 10, 10))}  # CPU dry run of this script (TRITON_INTERPRET=1)
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
BLOCK = 128


def random_plan(heads: int, n: int, density: float, gen: torch.Generator, device: str) -> BlockPlan:
    """The random plans ``dit-sparse tune`` tunes (:func:`dit_sparse.tune.random_plan`), at this benchmark's block."""
    return tune_random_plan(n, heads, BLOCK, density, device=device, generator=gen)


def radial_plan(n: int, frames: int, device: str) -> BlockPlan:
    """Radial-like static plan: full attention inside a frame, a spatial band that halves each time the frame
    distance doubles (|Δs| <= F / 2^ceil(log2(Δt + 1)) / 2, F = tokens per frame), kept at block granularity."""
    m = -(-n // BLOCK)
    per_frame = n // frames
    centers = torch.arange(m, dtype=torch.float64) * BLOCK + BLOCK / 2
    t = (centers // per_frame).clamp(max=frames - 1)
    s = centers - t * per_frame
    dt_ = (t[:, None] - t[None, :]).abs()
    width = per_frame / torch.exp2(torch.ceil(torch.log2(dt_ + 1)))
    mask = (s[:, None] - s[None, :]).abs() <= width / 2 + BLOCK
    mask |= torch.eye(m, dtype=torch.bool)
    return BlockPlan.from_block_mask(mask.to(device), n, BLOCK)


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds (CUDA events via do_bench; a host clock for the CPU dry run)."""
    if not torch.cuda.is_available():
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def bench_rounds(fns: dict, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of :func:`bench` for each function, the functions taken in turn within a round: the
    GPU clock drifts over a long run (one config measured 33.8 and 38.8 ms minutes apart), so the numbers that are
    compared with each other are measured side by side."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------- GPU correctness
def check_suite(dev: str = "cuda") -> list[dict]:
    """Small shapes on the GPU against the reference backend: every feature, pointer and TMA paths, every config."""
    from dit_sparse.kernels.triton_attention import KernelConfig, candidate_configs, triton_block_attention

    rows = []
    g = torch.Generator().manual_seed(1)

    def one(b, h, n, d, block, dtype, perm, skip, kvlen, bcast, layout, cfg):
        mq = -(-n // block)
        mask = torch.rand(1 if bcast else b, 1 if bcast else h, mq, mq, generator=g) < 0.3
        mask |= torch.eye(mq, dtype=torch.bool)
        p = torch.randperm(n, generator=g).to(dev) if perm else None
        hm = tuple(HEAD_SKIP if i == 1 else 0 for i in range(h)) if skip else None
        plan = BlockPlan.from_block_mask(mask.to(dev), n, block, perm=p, head_mode=hm).check()
        if layout == "bnhd":
            q, k, v = (torch.randn(b, n, h, d, generator=g).to(dev, dtype).permute(0, 2, 1, 3) for _ in range(3))
        else:
            q, k, v = (torch.randn(b, h, n, d, generator=g).to(dev, dtype) for _ in range(3))
        kl = torch.tensor([n, n - 60][:b], device=dev) if kvlen else None
        o, lse = triton_block_attention(AttentionCall(q, k, v, plan, d**-0.5, True, kl), config=cfg)
        ro, rl = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True, kv_len=kl)
        fin = torch.isfinite(rl)
        ok_inf = bool(torch.equal(torch.isfinite(lse), fin))
        err = rel_err(o, ro)
        lerr = float((lse[fin] - rl[fin]).abs().max()) if fin.any() else 0.0
        passed = (
            ok_inf
            and err < (2e-2 if dtype == torch.bfloat16 else 5e-3)
            and lerr < 1e-2
            and bool(torch.isfinite(o).all())
        )
        row = dict(
            b=b,
            h=h,
            n=n,
            d=d,
            block=block,
            dtype=str(dtype),
            perm=perm,
            skip=skip,
            kv_len=kvlen,
            bcast=bcast,
            layout=layout,
            config=str(cfg),
            rel_err=err,
            lse_err=lerr,
            passed=passed,
        )
        rows.append(row)
        print(("PASS " if passed else "FAIL ") + json.dumps(row), flush=True)

    for d in (128, 64):
        for cfg in candidate_configs(d, torch.bfloat16):
            try:
                one(
                    2,
                    3,
                    1000 if dev == "cuda" else 200,
                    d,
                    128,
                    torch.bfloat16,
                    False,
                    False,
                    False,
                    False,
                    "bnhd",
                    cfg,
                )
            except Exception as e:  # report, keep going
                rows.append(dict(d=d, config=str(cfg), error=f"{type(e).__name__}: {e}"[:500], passed=False))
                print("ERROR", d, cfg, e, flush=True)
    # pointer loads; TMA loads (a permuted plan gathers K and V into copies first)
    configs = (KernelConfig(128, 64, 4, 3), KernelConfig(128, 64, 4, 3, True))
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64)):
        for cfg in configs:
            for perm, skip, kvlen, bcast, layout in [
                (False, False, False, False, "bhnd"),
                (True, False, False, False, "bnhd"),
                (False, True, True, False, "bnhd"),
                (True, True, True, True, "bnhd"),
                (False, False, True, True, "bhnd"),
            ]:
                try:
                    one(2, 3, 777 if dev == "cuda" else 170, d, 128, dtype, perm, skip, kvlen, bcast, layout, cfg)
                except Exception as e:
                    rows.append(dict(d=d, config=str(cfg), error=f"{type(e).__name__}: {e}"[:500], passed=False))
                    print("ERROR", e, flush=True)
    try:  # float32 path and a small plan block (64)
        one(1, 2, 300, 64, 64, torch.float32, True, False, True, False, "bnhd", None)
    except Exception as e:
        rows.append(dict(error=f"fp32: {type(e).__name__}: {e}"[:500], passed=False))
        print("ERROR fp32", e, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- benchmark
def run_shape(name: str, densities: list[float], args, results: dict) -> None:
    from dit_sparse.kernels import triton_attention as ta

    heads, n, d, grid = {**SHAPES, **DRY_RUN_SHAPES}[name]
    layout = TokenLayout(*grid)
    assert layout.seq_len == n, (grid, n)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    # the layout Diffusers hands to attention: a BHND view of BNHD memory
    q, k, v = (torch.randn(1, n, heads, d, device=dev, dtype=dtype).permute(0, 2, 1, 3) for _ in range(3))
    flops_dense = 4 * heads * n * n * d
    out = {"shape": dict(B=1, H=heads, N=n, D=d), "rows": []}
    results["shapes"].append(out)

    # dense SDPA: whatever torch picks, and cuDNN explicitly
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if dev == "cpu":
        args.no_flex = True
    sdpa_fns = {}
    for label, backends in (
        ("auto", None),
        ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
        ("flash", [SDPBackend.FLASH_ATTENTION]),
    ):

        def fn(backends=backends):
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v)

        try:
            fn()
            sdpa_fns[label] = fn
        except Exception as e:
            print(f"sdpa {label} failed: {e}", flush=True)
    fp8 = fp8_supported(dev) and not args.no_fp8
    if fp8:
        sage = sageattention_fn(q, k, v)
        if sage is not None:
            sdpa_fns["sageattention"] = sage
    sdpa = {label: None for label in ("auto", "cudnn", "flash")} | bench_rounds(sdpa_fns, args.rounds)
    out["sdpa_ms"] = sdpa
    sdpa_ref = sdpa["auto"]
    print(f"\n== {name}: SDPA auto {sdpa['auto']} ms, cudnn {sdpa['cudnn']} ms, flash {sdpa['flash']} ms", flush=True)
    dense_out = F.scaled_dot_product_attention(q, k, v)

    plans = [(f"random-{x:g}", random_plan(heads, n, x, gen, dev)) for x in densities]
    if not args.no_radial:
        plans.append(("radial", radial_plan(n, layout.frames, dev)))
    while plans:
        label, plan = plans[0]
        density = plan.density()
        flops = flops_dense * density
        row = dict(plan=label, density=density)
        # Triton: first call autotunes (excluded), then timed
        t0 = time.perf_counter()
        o_t = block_sparse_attention(q, k, v, plan, backend="triton")
        _sync()
        row["triton_first_call_s"] = time.perf_counter() - t0
        row["triton_config"] = str(ta.TUNER.last)
        fns = {
            "triton_ms": lambda plan=plan: block_sparse_attention(q, k, v, plan, backend="triton"),
            "triton_ms_lse": lambda plan=plan: block_sparse_attention(q, k, v, plan, backend="triton", return_lse=True),
        }
        if fp8:  # first call autotunes (excluded); the pre-pass is part of every timed call
            o_8 = block_sparse_attention(q, k, v, plan, backend="triton", precision="fp8")
            row["fp8_config"] = str(ta.TUNER.last)
            row["fp8_rel_err_vs_bf16"] = rel_err(o_8, o_t)
            del o_8
            fns["fp8_ms"] = lambda plan=plan: block_sparse_attention(q, k, v, plan, backend="triton", precision="fp8")
        # FlexAttention on the identical BlockMask (compiled)
        if not args.no_flex:
            try:
                t0 = time.perf_counter()
                o_f = block_sparse_attention(q, k, v, plan, backend="flex")
                _sync()
                row["flex_first_call_s"] = time.perf_counter() - t0
                row["rel_err_vs_flex"] = rel_err(o_t, o_f)
                del o_f
                fns["flex_ms"] = lambda plan=plan: block_sparse_attention(q, k, v, plan, backend="flex")
            except Exception as e:
                row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
                print("flex failed:", row["flex_error"], flush=True)
        row.update(bench_rounds(fns, args.rounds))
        if density >= 0.999:
            row["rel_err_vs_sdpa"] = rel_err(o_t, dense_out)
        row["triton_tflops"] = flops / row["triton_ms"] * 1e-9
        if row.get("fp8_ms"):
            row["fp8_tflops"] = flops / row["fp8_ms"] * 1e-9
            row["fp8_speedup_vs_bf16"] = row["triton_ms"] / row["fp8_ms"]
            if sdpa.get("cudnn"):
                row["fp8_speedup_vs_cudnn"] = sdpa["cudnn"] / row["fp8_ms"]
        if row.get("flex_ms"):
            row["flex_tflops"] = flops / row["flex_ms"] * 1e-9
            row["speedup_vs_flex"] = row["flex_ms"] / row["triton_ms"]
        if sdpa_ref:
            row["speedup_vs_sdpa"] = sdpa_ref / row["triton_ms"]
        if sdpa.get("cudnn"):
            row["speedup_vs_cudnn"] = sdpa["cudnn"] / row["triton_ms"]
        del o_t
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del plan, plans[0]  # frees the plan's derived data (flex's BlockMask) before the next one

    if fp8:  # the quantization pre-pass alone (it reads q, k, v and writes their 8-bit copies)
        from dit_sparse.kernels.quant import quantize_fp8

        full = BlockPlan.full(n, BLOCK, device=dev)
        out["fp8_prepass_ms"] = bench(lambda: quantize_fp8(q, k, v, full, None, d**-0.5, False))

    # plan handling and permutation: the methods' permutations (and a random one, the worst case) at two densities,
    # through both strategies: rows gathered in the kernel, or K and V gathered into copies first (TMA loads)
    perms = {
        "random": torch.randperm(n, device=dev),
        "position-major (rettention, svdit)": layout.tile_permutation((layout.frames, 1, 1), device=dev),
        "tile 1x8x16 (draft)": layout.tile_permutation((1, 8, 16), device=dev),
    }
    perm_rows = []
    for x in (0.25, 0.05):
        base = random_plan(heads, n, x, gen, dev)
        block_sparse_attention(q, k, v, base, backend="triton")
        for kind, perm in perms.items():
            permuted = BlockPlan(
                base.seq_len, base.block_q, base.block_kv, base.kv_num_blocks, base.kv_indices, perm=perm
            )
            _sync()
            t0 = time.perf_counter()
            ta._prepare(permuted, heads)
            _sync()
            prep_ms = (time.perf_counter() - t0) * 1e3
            ta.TUNER.forget(lambda key: key.perm)  # tune for this permutation, as a method's first call does
            n_log = len(ta.TUNER.log)
            block_sparse_attention(q, k, v, permuted, backend="triton")
            r = dict(perm=kind, density=x, prep_ms_once=prep_ms, auto_config=str(ta.TUNER.last))
            fns = {  # the plan without the permutation is timed side by side with the permuted runs
                "triton_ms": lambda base=base: block_sparse_attention(q, k, v, base, backend="triton"),
                "auto_ms": lambda p=permuted: block_sparse_attention(q, k, v, p, backend="triton"),
            }
            tuned = [e for e in ta.TUNER.log[n_log:] if "ms" in e]
            for strategy, tma in (("gather", False), ("kv_copy", True)):
                cands = [e for e in tuned if ("-tma" in e["config"]) == tma]
                if cands:
                    r[f"{strategy}_config"] = best = min(cands, key=lambda e: e["ms"])["config"]
                    cfg = next(c for c in ta._fitted(d, dtype, BLOCK, BLOCK) if str(c) == best)
                    fns[f"{strategy}_ms"] = lambda p=permuted, cfg=cfg: ta.triton_block_attention(
                        AttentionCall(q, k, v, p, d**-0.5, False, None), config=cfg
                    )
            fns["kv_copy_alone_ms"] = lambda perm=perm: [ta._gather_tokens(t, perm) for t in (k, v)]
            r.update(bench_rounds(fns, args.rounds))
            for strategy in ("auto", "gather", "kv_copy"):
                if f"{strategy}_ms" in r:
                    r[f"{strategy}_overhead"] = r[f"{strategy}_ms"] / r["triton_ms"] - 1
            perm_rows.append(r)
            print(json.dumps(r), flush=True)
    # host time per API call (plan cached): CPU wall time per call while the GPU queue is full
    small = random_plan(heads, n, 0.05, gen, dev)
    block_sparse_attention(q, k, v, small, backend="triton")
    _sync()
    t0 = time.perf_counter()
    for _ in range(20):
        block_sparse_attention(q, k, v, small, backend="triton")
    host_us = (time.perf_counter() - t0) / 20 * 1e6
    _sync()
    out["plan_handling"] = dict(perm=perm_rows, host_us_per_call_upper_bound=host_us)


def fp8_supported(dev: str) -> bool:
    """Whether ``precision="fp8"`` runs here (the triton backend on a Hopper or newer GPU)."""
    return dev == "cuda" and torch.cuda.get_device_capability() >= (9, 0)


def sageattention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Dense ``sageattention.sageattn`` on q/k/v (BHND), or None when the package is missing or fails here."""
    try:
        from sageattention import sageattn
    except ImportError:
        print("sageattention is not installed: no sageattention row", flush=True)
        return None

    def fn():
        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)

    try:
        fn()
    except Exception as e:  # report, keep going
        print(f"sageattention failed: {type(e).__name__}: {e}", flush=True)
        return None
    return fn


def host_overhead() -> dict:
    """Host microseconds per call on a tiny problem (the GPU finishes each kernel in a few µs, so the host bounds it)."""
    from dit_sparse.kernels import triton_attention as ta

    heads, n, d = 2, 1024, 128
    q, k, v = (torch.randn(1, n, heads, d, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3) for _ in range(3))
    plan = random_plan(heads, n, 0.5, torch.Generator().manual_seed(0), "cuda")
    prep = ta._prepare(plan, heads)
    out_mem = torch.empty(1, n, heads, d, device="cuda", dtype=torch.bfloat16)
    tma, ptr = ta.KernelConfig(128, 64, 4, 3, True), ta.KernelConfig(128, 64, 4, 3)
    call = AttentionCall(q, k, v, plan, d**-0.5, False, None)
    cases = {
        "api_block_sparse_attention": lambda: block_sparse_attention(q, k, v, plan, backend="triton"),
        "triton_block_attention_tma": lambda: ta.triton_block_attention(call, config=tma),
        "triton_block_attention_ptr": lambda: ta.triton_block_attention(call, config=ptr),
        "launch_only_tma": lambda: ta._launch(q, k, v, plan, prep, d**-0.5, out_mem, None, None, tma),
        "launch_only_ptr": lambda: ta._launch(q, k, v, plan, prep, d**-0.5, out_mem, None, None, ptr),
        "torch_empty_x2_baseline": lambda: (torch.empty_like(q), torch.empty_like(k)),
    }
    res = {}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        _sync()
        t0 = time.perf_counter()
        for _ in range(300):
            fn()
        res[name] = (time.perf_counter() - t0) / 300 * 1e6
        _sync()
    print("host µs per call:", json.dumps({k_: round(v_, 1) for k_, v_ in res.items()}), flush=True)
    return res


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        f"# Kernel benchmark {results['date']}",
        "",
        f"- device: {results['device']}; torch {results['torch']}; triton {results['triton']}; python {results['python']}",
        f"- command: `{results['command']}`",
        "- B=1, bf16, q/k/v = BHND views of BNHD memory; block 128; median of `triton.testing.do_bench`, the "
        f"timings compared with each other taken in turn, median of {results.get('rounds', 1)} rounds; "
        "effective TFLOP/s = 4·B·H·N²·D·density / time (density = exact computed fraction of the plan).",
        "",
    ]
    for s in results["shapes"]:
        sh = s["shape"]
        sd = s["sdpa_ms"]
        lines += [
            f"## H={sh['H']}, N={sh['N']}, D={sh['D']}",
            "",
            f"Dense SDPA: auto {_f(sd.get('auto'))} ms, cuDNN {_f(sd.get('cudnn'))} ms, flash {_f(sd.get('flash'))} ms "
            f"(cuDNN {_f(4 * sh['H'] * sh['N'] ** 2 * sh['D'] / sd['cudnn'] * 1e-9 if sd.get('cudnn') else None)} TFLOP/s)"
            + (f", sageattention {_f(sd['sageattention'])} ms" if sd.get("sageattention") else "")
            + (f"; fp8 pre-pass alone {_f(s['fp8_prepass_ms'])} ms" if s.get("fp8_prepass_ms") else ""),
            "",
            "| plan | density | triton ms | triton TFLOP/s | flex ms | flex TFLOP/s | vs flex | vs SDPA auto | vs cuDNN | config "
            "| fp8 ms | fp8 TFLOP/s | fp8 vs bf16 | fp8 vs cuDNN | fp8 err vs bf16 | fp8 config |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in s["rows"]:
            lines.append(
                f"| {r['plan']} | {r['density']:.3f} | {_f(r['triton_ms'])} | {_f(r.get('triton_tflops'), 0)} | "
                f"{_f(r.get('flex_ms'))} | {_f(r.get('flex_tflops'), 0)} | {_f(r.get('speedup_vs_flex'), 2)}x | "
                f"{_f(r.get('speedup_vs_sdpa'), 2)}x | {_f(r.get('speedup_vs_cudnn'), 2)}x | {r.get('triton_config', '')} | "
                f"{_f(r.get('fp8_ms'))} | {_f(r.get('fp8_tflops'), 0)} | {_f(r.get('fp8_speedup_vs_bf16'), 2)}x | "
                f"{_f(r.get('fp8_speedup_vs_cudnn'), 2)}x | {_f(r.get('fp8_rel_err_vs_bf16'), 4)} | {r.get('fp8_config', '')} |"
            )
        ph = s.get("plan_handling")
        if ph:
            lines += [
                "",
                "Permutation (the same random plan with the permutation; autotuned, and each strategy's best config):",
                "",
                "| permutation | density | no perm ms | auto ms (+%) | auto config | gather in kernel ms (+%) | "
                "K/V copy + TMA ms (+%) | K/V copy alone ms |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in ph["perm"]:
                lines.append(
                    f"| {r['perm']} | {r['density']} | {_f(r['triton_ms'])} | {_f(r['auto_ms'])} "
                    f"({100 * r['auto_overhead']:+.1f}%) | {r['auto_config']} | {_pct(r, 'gather')} | "
                    f"{_pct(r, 'kv_copy')} | {_f(r['kv_copy_alone_ms'])} |"
                )
            lines.append(
                f"\nPlan preprocessing, once per plan: {_f(max(r['prep_ms_once'] for r in ph['perm']))} ms at most"
            )
            lines.append(
                f"\nHost time per API call on a cached plan (upper bound): {ph['host_us_per_call_upper_bound']:.0f} µs"
            )
        lines.append("")
    if results.get("host_us"):
        lines += [
            "Host µs per call (tiny problem, GPU idle): "
            + ", ".join(f"{k}: {v:.0f}" for k, v in results["host_us"].items()),
            "",
        ]
    if results.get("check"):
        bad = [r for r in results["check"] if not r.get("passed")]
        lines.append(f"GPU correctness suite: {len(results['check']) - len(bad)}/{len(results['check'])} passed")
    if results.get("tuning"):
        lines += ["", "## Autotuning (first call per key)", "", "| key | config | ms |", "| --- | --- | --- |"]
        for e in results["tuning"]:
            lines.append(f"| {e['key']} | {e['config']} | {_f(e.get('ms'))} {e.get('error', '')[:80]} |")
    path.write_text("\n".join(lines) + "\n")


def _f(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def _pct(r: dict, strategy: str) -> str:
    if f"{strategy}_ms" not in r:
        return "-"
    return f"{_f(r[strategy + '_ms'])} ({100 * r[strategy + '_overhead']:+.1f}%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of HxNxD among " + ", ".join(SHAPES))
    ap.add_argument("--densities", default=",".join(f"{x:g}" for x in DENSITIES))
    ap.add_argument("--check", action="store_true", help="run the GPU correctness suite first")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-radial", action="store_true")
    ap.add_argument("--no-fp8", action="store_true", help="skip the precision='fp8' rows (and sageattention)")
    ap.add_argument("--rounds", type=int, default=3, help="timings compared with each other: median of this many")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    args = ap.parse_args()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit(
            "benchmarks/kernel_speed.py needs a CUDA GPU (or TRITON_INTERPRET=1 with --shapes 2x700x64 as a dry run)"
        )

    from dit_sparse.kernels import triton_attention as ta

    torch._dynamo.config.cache_size_limit = 64  # one flex compile per plan closure at most
    torch.backends.cuda.matmul.allow_tf32 = False
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    results = dict(
        environment(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join(sys.argv),
        env={k: v for k, v in os.environ.items() if k.startswith("DIT_SPARSE")},
        rounds=args.rounds,
        shapes=[],
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernels-{date}{args.tag}"
    if args.check or args.check_only:
        results["check"] = check_suite("cuda" if torch.cuda.is_available() else "cpu")
        bad = [r for r in results["check"] if not r.get("passed")]
        print(f"GPU correctness: {len(results['check']) - len(bad)}/{len(results['check'])} passed", flush=True)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    if not args.check_only and torch.cuda.is_available():
        results["host_us"] = host_overhead()
    if not args.check_only:
        densities = [float(x) for x in args.densities.split(",")]
        for name in args.shapes.split(","):
            run_shape(name, densities, args, results)
            torch.cuda.empty_cache()
            results["tuning"] = list(ta.TUNER.log)
            stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
            write_markdown(results, stem.with_suffix(".md"))
    results["tuning"] = list(ta.TUNER.log)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_markdown(results, stem.with_suffix(".md"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
