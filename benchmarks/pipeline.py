"""Whole generations as users time them (GPU): ``dit-sparse bench --pipeline`` (see ``dit_sparse.bench.pipeline``).

    python benchmarks/pipeline.py --models wan2.1-1.3b --shapes 480p --configs dense radial sage fbc \\
        radial+compile --out benchmarks/results/pipeline-X
    python benchmarks/pipeline.py --models wan2.1-14b --compose --configs dense radial --out ...   # step kinds
    python benchmarks/pipeline.py --shapes 480p --compose --measure --configs dense radial   # check composition
"""

from __future__ import annotations

import sys

from dit_sparse.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--pipeline", *sys.argv[1:]]))
