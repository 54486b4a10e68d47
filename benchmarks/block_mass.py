"""AdaSpa's block-mass kernel (dit_sparse/kernels/block_mass.py) on the device: correctness, launch configurations, speed vs SDPA.

    python benchmarks/block_mass.py --out benchmarks/results     # writes block-mass-<date>.{json,md}

1. Triton against the torch reference on small odd shapes (bf16, fp16, fp32; power-of-two and other blocks).
2. Every candidate configuration at Wan2.1-1.3B's attention shapes (B=1, H=12, D=128, bf16, BHND views of BNHD
   memory), with a given LSE (a later search step) and without (the kernel computes it: a first search).
3. The autotuned call against dense SDPA on the same q/k/v (the scoring pass is the search step's extra cost).
Times: median of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from dit_sparse.kernels.block_mass import TUNER, _launch, block_mass, candidate_configs

SHAPES = {"wan2.1-1.3b-480p": 32760, "wan2.1-1.3b-720p": 75600}
HEADS, HEAD_DIM = 12, 128
CHECKS = [(2, 4, 4100, 128, 64, torch.bfloat16), (1, 3, 5000, 64, 128, torch.float16),
          (1, 2, 3000, 128, 48, torch.bfloat16), (1, 2, 2048, 64, 64, torch.float32)]  # fmt: skip


def _qk(b: int, h: int, n: int, d: int, dtype: torch.dtype, count: int = 2) -> list[torch.Tensor]:
    return [torch.randn(b, n, h, d, device="cuda", dtype=dtype).permute(0, 2, 1, 3) for _ in range(count)]


def run(blocks: list[int]) -> dict:
    res: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join(["python", *sys.argv]), "device": torch.cuda.get_device_name(),
                 "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                 "checks": [], "configs": [], "speed": []}  # fmt: skip
    torch.manual_seed(0)
    for b, h, n, d, block, dtype in CHECKS:
        q, k = _qk(b, h, n, d, dtype)
        ref, ref_lse = block_mass(q, k, block, backend="reference")
        got, lse = block_mass(q, k, block, backend="triton")
        cached, _ = block_mass(q, k, block, lse=ref_lse, backend="triton")
        res["checks"].append(dict(shape=[b, h, n, d], block=block, dtype=str(dtype),
                                  mass_err=float((got - ref).abs().max()), lse_err=float((lse - ref_lse).abs().max()),
                                  cached_err=float((cached - ref).abs().max()), mass_max=float(ref.max())))  # fmt: skip
        print("check", res["checks"][-1], flush=True)
    for shape, n in SHAPES.items():
        q, k, v = _qk(1, HEADS, n, HEAD_DIM, torch.bfloat16, 3)
        sdpa = triton.testing.do_bench(partial(F.scaled_dot_product_attention, q, k, v), warmup=3, rep=30)
        for block in blocks:
            _, lse = block_mass(q, k, block)
            for given in (True, False):
                use = lse if given else None
                for c in candidate_configs(block, interpret=False):
                    launch = partial(_launch, q, k, block, use, lse.clone(), HEAD_DIM**-0.5, c)
                    ms = triton.testing.do_bench(launch, warmup=2, rep=20)
                    res["configs"].append(dict(shape=shape, block=block, lse_given=given, config=str(c), ms=ms))
                    print(f"{shape} block {block} lse given {given} {c}: {ms:.2f} ms", flush=True)
                ms = triton.testing.do_bench(partial(block_mass, q, k, block, use), warmup=3, rep=30)
                res["speed"].append(dict(shape=shape, block=block, lse_given=given, ms=ms, sdpa_ms=sdpa,
                                         config=str(TUNER.last)))  # fmt: skip
                print(f"{shape} block {block} lse given {given}: autotuned {ms:.2f} ms, SDPA {sdpa:.2f} ms", flush=True)
    res["tuning"] = list(TUNER.log)
    return res


def write_markdown(res: dict, path: Path) -> None:
    lines = [f"# Block-mass kernel (AdaSpa's search) — {res['date']}", "",
             f"- device: {res['device']}; torch {res['torch']}; triton {res['triton']}; python {res['python']}",
             f"- command: `{res['command']}`", "- B=1, H=12, D=128, bf16, BHND views of BNHD memory; median of "
             "`triton.testing.do_bench`", "", "## Speed (autotuned) vs dense SDPA on the same q/k/v", "",
             "| shape | block | LSE | block mass ms | SDPA ms | ratio |", "| --- | ---: | --- | ---: | ---: | ---: |"]  # fmt: skip
    for r in res["speed"]:
        lse = "given (later search)" if r["lse_given"] else "computed (first search)"
        lines.append(f"| {r['shape']} | {r['block']} | {lse} | {r['ms']:.2f} | {r['sdpa_ms']:.2f} | "
                     f"{r['ms'] / r['sdpa_ms']:.2f}x |")  # fmt: skip
    lines += ["", "## Launch configurations", "", "| shape | block | LSE given | config | ms |",
              "| --- | ---: | --- | --- | ---: |"]  # fmt: skip
    lines += [f"| {r['shape']} | {r['block']} | {r['lse_given']} | {r['config']} | {r['ms']:.2f} |"
              for r in res["configs"]]  # fmt: skip
    lines += ["", "## Triton vs torch reference (max abs error)", "", "| shape | block | dtype | mass | LSE | "
              "mass, given LSE | largest mass |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    lines += [f"| {'x'.join(map(str, r['shape']))} | {r['block']} | {r['dtype']} | {r['mass_err']:.1e} | "
              f"{r['lse_err']:.1e} | {r['cached_err']:.1e} | {r['mass_max']:.2f} |" for r in res["checks"]]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="64,128", help="comma-separated block sizes (AdaSpa's default: 64)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/block_mass.py times the Triton kernel and needs an NVIDIA GPU")
    res = run([int(b) for b in args.blocks.split(",")])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"block-mass-{res['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write_markdown(res, stem.with_suffix(".md"))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
