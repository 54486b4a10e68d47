"""Speed of 3D sparse attention on the device: a random-weight DiT at a TRELLIS / Direct3D-S2-sized config.

    python benchmarks/speed3d.py                 # on the GPU: 24 blocks, width 1024, 16 heads, bf16
    python benchmarks/speed3d.py --smoke         # a tiny shape on the CPU (checks the script, times nothing real)

Two inputs: a dense volume of ``--grid³`` tokens (default 32³ = 32,768: a 64³ latent in 2³ patches; ``--grid 64``
for one token per cell of a 64³ latent, 262,144 tokens) as ``TokenLayout(frames=G, height=G, width=G)``, and
``--voxels`` sparse voxel tokens (default 50,000: a one-cell sphere shell in a 256³ grid, in a random token order)
as a ``VoxelLayout``. Per input and method (dense SDPA, window3d, ssa at their defaults, or ``--methods``):

- per attention call: ``F.scaled_dot_product_attention`` (dense) against the method's plan + block-sparse kernel
  (ssa plans at every call, so its planning time counts; window3d's plan is static and cached);
- per forward: the whole DiT (adaLN-Zero blocks of :mod:`dit_sparse.model3d.model`) with the method applied
  through ``dit_sparse.apply(blocks, method, layout=...)``, and the Amdahl limit of the forward given the
  attention share of the dense forward and the per-call speedup.

Writes benchmarks/results/speed3d-<date>[-smoke].json and .md with ``dit_sparse.files.environment()``.
"""

import argparse
import datetime
import math
import shlex
import sys

import torch
import torch.nn.functional as F
from torch import nn

import dit_sparse
from dit_sparse.files import atomic_write_json, atomic_write_text, environment
from dit_sparse.kernels import block_sparse_attention
from dit_sparse.layout import TokenLayout, VoxelLayout
from dit_sparse.methods import get_method, parse_method_spec
from dit_sparse.model3d.model import Block
from dit_sparse.state import StepContext
from dit_sparse.timing import median_ms


class Blocks(nn.Module):
    """The DiT body: ``depth`` adaLN-Zero blocks over tokens ``[B, N, width]`` with a conditioning vector."""

    def __init__(self, width: int, heads: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, 4) for _ in range(depth))
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)  # random weights (the zero-initialised modulation would skip nothing anyway)

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, c)
        return tokens


def shell(count: int, res: int, seed: int = 0) -> torch.Tensor:
    """``count`` voxels of a one-cell-thick sphere shell centred in a ``res³`` grid (random token order)."""
    radius = min(math.sqrt(count / (4 * math.pi)) * 1.02, res / 2 - 2)
    g = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
    coords = []
    for x in range(res):  # one slab at a time: res² cells in memory, not res³
        d = torch.sqrt(g[x] ** 2 + g[:, None] ** 2 + g[None, :] ** 2)
        yz = ((d - radius).abs() < 0.5).nonzero()
        coords.append(torch.cat([torch.full((len(yz), 1), x), yz], 1))
    c = torch.cat(coords)
    c = c[torch.randperm(len(c), generator=torch.Generator().manual_seed(seed))]
    if len(c) < count:
        raise ValueError(f"a shell in {res}³ holds only {len(c)} voxels; raise --res")
    return c[:count]


def measure(model: Blocks, label: str, layout, args: argparse.Namespace, device, dtype) -> list[dict]:
    """The dense row and one row per method for one input."""
    n, head_dim = layout.seq_len, args.width // args.heads
    q, k, v = (torch.randn(1, args.heads, n, head_dim, device=device, dtype=dtype) for _ in range(3))
    tokens = torch.randn(1, n, args.width, device=device, dtype=dtype)
    c = torch.randn(1, args.width, device=device, dtype=dtype)
    attn_dense = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, args.repeats)
    fwd_dense = median_ms(lambda: model(tokens, c), device, args.repeats)
    share = min(1.0, attn_dense * args.depth / fwd_dense)
    rows = [{"input": label, "tokens": n, "method": "dense", "attention_ms": round(attn_dense, 3),
             "forward_ms": round(fwd_dense, 2), "attention_share": round(share, 3)}]  # fmt: skip
    print(rows[-1])
    for spec in args.methods:
        name, params = parse_method_spec(spec)
        params = {"min_seq_len": 0, **params}
        method = get_method(name, **params)
        ctx = StepContext(0, None, "cond", "blocks.0.attn", 0, layout)

        def call(method=method, ctx=ctx) -> torch.Tensor:
            return block_sparse_attention(q, k, v, method.get_plan(q, k, layout, ctx), backend=args.backend)

        attn = median_ms(call, device, args.repeats)
        density = method.get_plan(q, k, layout, ctx).density()
        dit_sparse.apply(model, name, layout=layout, backend=args.backend, **params)
        fwd = median_ms(lambda: model(tokens, c), device, args.repeats)
        dit_sparse.remove(model)
        speedup = attn_dense / attn
        limit = 1 / ((1 - share) + share / speedup)
        rows.append({
            "input": label, "tokens": n, "method": spec, "density": round(density, 4),
            "attention_ms": round(attn, 3), "attention_speedup": round(speedup, 2), "forward_ms": round(fwd, 2),
            "forward_speedup": round(fwd_dense / fwd, 2), "amdahl_limit": round(limit, 2),
            "of_limit": round(fwd_dense / fwd / limit, 3),
        })  # fmt: skip
        print(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["window3d", "ssa"], help="method specs (NAME:key=value;...)")
    ap.add_argument("--grid", type=int, default=32, help="dense volume tokens per axis (default 32)")
    ap.add_argument("--voxels", type=int, default=50_000, help="sparse voxel tokens (default 50,000)")
    ap.add_argument("--res", type=int, default=256, help="grid of the sparse voxels (default 256)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script end to end")
    ap.add_argument("--out", default=None, help="results prefix (default benchmarks/results/speed3d-<date>)")
    args = ap.parse_args()
    if args.smoke:
        args.grid, args.voxels, args.res, args.width, args.heads, args.depth, args.repeats = 8, 700, 24, 64, 2, 2, 1
        args.dtype = "float32"
    for spec in args.methods:
        parse_method_spec(spec)  # bad names / values fail before any work
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    out = args.out or f"benchmarks/results/speed3d-{datetime.date.today().isoformat()}{'-smoke' if args.smoke else ''}"
    torch.manual_seed(0)
    model = Blocks(args.width, args.heads, args.depth).to(device, dtype).eval()
    inputs = {
        f"dense {args.grid}³": TokenLayout(args.grid, args.grid, args.grid),
        f"voxels {args.voxels:,} in {args.res}³": VoxelLayout(shell(args.voxels, args.res).to(device)),
    }
    rows = []
    with torch.no_grad():
        for label, layout in inputs.items():
            rows += measure(model, label, layout, args, device, dtype)
    config = {k: getattr(args, k) for k in ("grid", "voxels", "res", "width", "heads", "depth", "dtype", "backend")}
    result = {"command": "python " + shlex.join(sys.argv), "environment": environment(), "config": config, "rows": rows}
    atomic_write_json(out + ".json", result)
    env = result["environment"]
    lines = [
        f"# 3D sparse attention speed ({args.depth} blocks, width {args.width}, {args.heads} heads, {args.dtype})",
        "",
        f"`{result['command']}` on {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"{env.get('date')}. Per attention call: plan + kernel against dense SDPA; per forward: the whole random-"
        "weight DiT; Amdahl limit from the dense forward's attention share.",
        "",
        "| input | method | density | attention ms | × dense | forward ms | × dense | Amdahl limit | of limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["method"] == "dense":
            lines.append(f"| {r['input']} | dense (attention {r['attention_share']:.0%} of the forward) | 1 | "
                         f"{r['attention_ms']} | 1 | {r['forward_ms']} | 1 | | |")  # fmt: skip
        else:
            lines.append(
                f"| {r['input']} | `{r['method']}` | {r['density']:.3f} | {r['attention_ms']} | "
                f"{r['attention_speedup']} | {r['forward_ms']} | {r['forward_speedup']} | {r['amdahl_limit']} | "
                f"{r['of_limit']:.0%} |"
            )
    atomic_write_text(out + ".md", "\n".join(lines) + "\n")
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
