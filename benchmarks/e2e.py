"""End-to-end transformer-forward benchmark on the GPU (issue 7: full-size video DiTs at real resolutions).

    python benchmarks/e2e.py --models wan2.1-1.3b --methods window radial --repeats 5
    python benchmarks/e2e.py --quick          # ~4 min on an H100: Wan2.1-1.3B 480p + 720p and HunyuanVideo 720p
    python benchmarks/e2e.py --models wan2.1-1.3b --shapes 720p --compile blocks   # + the same rows compiled

--quick: at most 3 repeats after 1 warm-up, smaller block subsets (printed as each model's note), and models
wan2.1-1.3b + hunyuanvideo unless --models says otherwise. Writes benchmarks/results/e2e-<date>[-quick].json and .md.
Same as `dit-sparse bench`.
"""

import argparse
import datetime
import shlex
import sys

from dit_sparse import bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=sorted(bench.MODELS),
        help=f"default: wan2.1-1.3b ({' '.join(bench.QUICK_MODELS)} with --quick)",
    )
    ap.add_argument("--shapes", nargs="+", default=None, help="shape names, e.g. 480p 720p (default: all)")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["window", "radial", "rettention", "draft", "adaspa"],
        help="method specs, e.g. radial:decay=0.2",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="light pass for a small GPU budget (see above)")
    ap.add_argument(
        "--compile",
        default="none",
        choices=bench.COMPILE_MODES,
        help="also time dense and each method with the model compiled: blocks (regional, "
        "compile_repeated_blocks) or full (torch.compile(transformer)), side by side with eager",
    )
    ap.add_argument("--out", default=None, help="results prefix (default benchmarks/results/e2e-<date>[-quick])")
    args = ap.parse_args()
    out = args.out or (
        f"benchmarks/results/e2e-{datetime.date.today().isoformat()}{'-quick' if args.quick else ''}"
        f"{'' if args.compile == 'none' else '-compile-' + args.compile}"
    )
    command = "python " + shlex.join(sys.argv)
    bench.run(
        args.models, args.shapes, args.methods, args.repeats, out, command, quick=args.quick, compile=args.compile
    )
