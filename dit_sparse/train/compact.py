"""Shrink a training checkpoint to what export needs (one set of weights, optionally fp16).

python -m dit_sparse.train.compact SRC DST --keep ema. [--half]
"""

from __future__ import annotations

import argparse

import torch

from .model import load_checkpoint, save_checkpoint


def compact(src: str, dst: str, keep: str, half: bool = False) -> int:
    """Copy the tensors of ``src`` whose names start with ``keep`` to ``dst``; returns their byte count."""
    tensors, meta = load_checkpoint(src)
    kept = {k: (v.half() if half and v.is_floating_point() else v) for k, v in tensors.items() if k.startswith(keep)}
    meta = dict(meta, compact_of=keep, half=half)
    save_checkpoint(dst, kept, meta)
    return sum(v.numel() * v.element_size() for v in kept.values())


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--keep", default="ema.")
    ap.add_argument("--half", action="store_true")
    args = ap.parse_args(argv)
    n = compact(args.src, args.dst, args.keep, args.half)
    print(f"{args.dst}: {n / 2**20:.1f} MiB")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
