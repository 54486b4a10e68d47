"""The ``dit-sparse`` command: ``generate``, ``eval``, ``bench`` and ``search`` (argument parsing; what each command
does is in :mod:`dit_sparse.commands`).

    dit-sparse generate "a red circle moving right" --method radial [--model PATH] [--steps N] [--seed S]
        [--frames F --height H --width W] [--guidance G] [--out video.mp4] [--force] [--param key=value ...] [--gpus N]
    dit-sparse eval --methods dense,window,radial --prompts FILE|builtin --seeds 0,1 --out runs/NAME
    dit-sparse bench [--models ...] [--methods ...] [--quick] [--compile none|blocks|full]   (CUDA only)
    dit-sparse bench --pipeline [--models ...] [--shapes ...] [--configs ...] [--compose [--measure]]   (CUDA only)
    dit-sparse search --model PATH --prompts "a cat" ... --out svdit.json   (offline Sparse-vDiT search)
    dit-sparse generate3d --prompt "a small cube at the left" --method window3d [--out shape.ply] [--force]

``python -m dit_sparse`` is the same command. Errors in the arguments, the output path, the model folder, the
device and backend, and runs too large for the machine are reported before any model is loaded: one line on stderr,
exit status 2. The choices come from the registries: methods (``dit_sparse.available_methods()``), backends
(``kernels.api.BACKENDS``), model families (``pipelines.supported_models()``), benchmark models (``bench.MODELS``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dit_sparse import bench, commands
from dit_sparse.bench import pipeline as bench_pipeline
from dit_sparse.estimate import EstimateError
from dit_sparse.eval.store import RunFolderBusy
from dit_sparse.kernels.api import BACKENDS, PRECISIONS
from dit_sparse.methods import available_methods, get_method, parse_method_spec
from dit_sparse.methods.base import parse_value
from dit_sparse.methods.svdit import SvditConfigError
from dit_sparse.methods.svdit_search import FEEDS, SELECTIONS
from dit_sparse.pipelines import supported_models
from dit_sparse.preflight import CLIError
from dit_sparse.tune import KERNELS as TUNE_KERNELS
from dit_sparse.tune import TuneError

PROG = "dit-sparse"
DTYPES = ("float32", "float16", "bfloat16")
# one line and exit status 2; anything else is a bug
USER_ERRORS = (CLIError, EstimateError, SvditConfigError, RunFolderBusy, TuneError)

__all__ = ["CLIError", "build_parser", "check_method", "main", "parse_params", "parse_seeds"]

# ------------------------------------------------------------------------------------------------ argument values

_KEY = re.compile(r"^[A-Za-z_]\w*$")


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["window=1,1,1", "dense_steps=2", "sink=false"]`` → ``{"window": (1, 1, 1), "dense_steps": 2, "sink": False}``
    (Python literals; ``true`` / ``false`` in any case are booleans)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not _KEY.match(key) or not value:
            raise CLIError(f"bad --param {item!r}: write key=value (e.g. --param window=1,1,1 --param dense_steps=2)")
        params[key] = {"true": True, "false": False}.get(value.lower(), None)
        if params[key] is None:
            params[key] = parse_value(value)
    return params


def check_method(name: str, params: dict[str, Any]) -> None:
    """Raise :class:`CLIError` unless ``name`` is a registered method (or ``none``) taking ``params``."""
    if name == "none":
        if params:
            raise CLIError("--method none (the model's own attention) takes no --param")
        return
    if name not in available_methods():
        raise CLIError(
            f"unknown method {name!r}; known methods: {', '.join(available_methods())} "
            "(or 'none' for the model's own attention)"
        )
    try:
        get_method(name, **params)  # the config's checks, and the method's own (svdit reads its config file)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-3"`` → seeds."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            seeds.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m else [int(part)])
        except ValueError:
            raise CLIError(
                f"bad --seeds {text!r}: write integers separated by commas (0,1,2) or a range (0-3)"
            ) from None
    if not seeds:
        raise CLIError(f"bad --seeds {text!r}: no seed given")
    return seeds


def _number(kind: type, low: float, strict: bool) -> Any:
    """An argparse type: a ``kind`` above ``low`` (``strict``) or at least ``low``."""

    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text!r}")
        return v

    conv.__name__ = f"{'positive' if strict else 'non-negative'} {kind.__name__}"
    return conv


_positive = _number(int, 0, strict=True)
_non_negative = _number(int, 0, strict=False)


def _finish(args: argparse.Namespace) -> None:
    """Values argparse cannot check alone (user errors: :class:`CLIError`): method params, specs, seeds."""
    if args.command in ("generate", "generate3d"):
        args.params = parse_params(args.param)
        check_method(args.method, args.params)
    elif args.command == "eval":
        from dit_sparse.eval.run import parse_methods  # noqa: PLC0415

        try:
            args.specs = parse_methods(",".join(args.methods), common=parse_params(args.param))
        except (TypeError, ValueError) as e:
            raise CLIError(f"--methods: {e}") from None
        args.seed_list = parse_seeds(args.seeds)
    elif args.command == "bench":
        if not args.pipeline:
            flags = [f for f in ("configs", "compose", "measure", "overwrite") if getattr(args, f)]
            if flags:
                raise CLIError(f"--{', --'.join(flags)}: only with --pipeline (whole generations)")
        elif args.methods or args.quick or args.compile != "none":
            raise CLIError("--pipeline takes --configs (e.g. radial radial+compile), not --methods/--quick/--compile")
        if args.measure and not args.compose:
            raise CLIError("--measure compares a composed total with a full run: give --compose too")
        for spec in args.methods or []:
            try:
                parse_method_spec(spec)
            except (TypeError, ValueError) as e:
                raise CLIError(f"--methods {spec}: {e}") from None


# ------------------------------------------------------------------------------------------------ parser


def _add_model_args(p: argparse.ArgumentParser, required: bool = False, steps: int | None = None) -> None:
    p.add_argument(
        "--model",
        required=required,
        help="local Diffusers pipeline folder (local files only, never downloaded"
        + ("" if required else "; default: the embedded tiny model")
        + f"); its transformer one of {', '.join(supported_models())}",
    )
    default = "the model's default" if steps is None else steps
    p.add_argument("--steps", type=_positive, default=steps, help=f"denoising steps (default: {default})")
    p.add_argument("--frames", type=_positive, help="frames of the video")
    p.add_argument("--height", type=_positive, help="height in pixels")
    p.add_argument("--width", type=_positive, help="width in pixels")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="block-sparse kernel backend (default: auto)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPES, help="load the pipeline in this dtype")
    p.add_argument(
        "--ignore-estimate",
        action="store_true",
        help="run even when the estimate of tokens, memory and time says the run will not fit or take very long",
    )


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--negative-prompt", help="negative prompt")
    p.add_argument("--fps", type=_positive, help="frames per second of the written video")


def _add_generate(sub: Any) -> None:
    g = sub.add_parser(
        "generate",
        help="generate a video with a sparse-attention method",
        description="Generate one video with a sparse-attention method.",
    )
    g.add_argument("prompt", nargs="?", default=None, help="text prompt (default: the embedded model's example)")
    g.add_argument(
        "--method",
        required=True,
        help=f"sparse-attention method ({', '.join(available_methods())}), or 'none' for the model's own attention",
    )
    g.add_argument("--param", action="append", metavar="KEY=VALUE", help="method hyper-parameter (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: the model's default, else 0)")
    g.add_argument("--out", help="output video (.mp4 or .gif; default: <prompt>-<method>-s<seed>.mp4)")
    g.add_argument("--force", "--overwrite", action="store_true", help="overwrite an existing output file")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--gpus", type=_positive, default=1, help="run on N local GPUs (torchrun, Ulysses context parallelism)"
    )
    _add_generation_args(g)
    g.set_defaults(func=commands.cmd_generate)


def _add_eval(sub: Any) -> None:
    e = sub.add_parser(
        "eval",
        help="quality vs speed of methods against dense attention",
        description="Quality (PSNR/SSIM/LPIPS vs the dense video) and speed of each method setting.",
    )
    e.add_argument(
        "--methods",
        action="append",
        required=True,
        metavar="SPECS",
        help="comma-separated method settings, e.g. dense,window:window=1,1,1;tile=2,8,8,radial (repeatable)",
    )
    e.add_argument("--prompts", default="builtin", help="a text file with one prompt per line, or 'builtin'")
    e.add_argument("--seeds", default="0", help="seeds, e.g. 0,1 or 0-3 (default 0)")
    e.add_argument("--out", help="run folder (default runs/eval-<date>-<time>); rerunning resumes it")
    e.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="hyper-parameter for every method (repeatable)"
    )
    e.add_argument(
        "--error-sample",
        type=_non_negative,
        default=1,
        help="attention error on every n-th layer, in an extra untimed pass (0: off; default 1)",
    )
    e.add_argument("--cache-dir", help="dense reference cache (default <out>/dense)")
    e.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    e.add_argument("--no-videos", action="store_true", help="skip the side-by-side videos")
    e.add_argument("--amplify", type=float, default=4.0, help="gain of the difference panel (default 4)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_generation_args(e)
    e.set_defaults(func=commands.cmd_eval)


def _add_bench(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="speed on full-size architectures (CUDA only)",
        description="Transformer-forward timing, dense vs methods, on full-size video DiTs (CUDA only).",
    )
    b.add_argument(
        "--models", nargs="+", default=None, choices=sorted(bench.MODELS), help="models (default: the first)"
    )
    b.add_argument("--shapes", nargs="+", default=None, help="shape names, e.g. 480p 720p (default: all)")
    b.add_argument("--methods", nargs="+", default=None, help="method specs, e.g. window radial:decay=0.2")
    b.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        help="timed repeats (median; default 5; --pipeline --compose: 2 timed skeleton passes)",
    )
    b.add_argument("--quick", action="store_true", help="light pass: fewer repeats and blocks (see dit_sparse.bench)")
    b.add_argument(
        "--compile",
        default="none",
        choices=bench.COMPILE_MODES,
        help="also time dense and each method compiled: blocks (regional) or full, next to eager",
    )
    b.add_argument("--out", help="results prefix (default benchmarks/results/e2e-<date>[-quick][-compile-<mode>])")
    w = b.add_argument_group("whole generations (--pipeline; see dit_sparse.bench.pipeline)")
    w.add_argument("--pipeline", action="store_true", help="time whole pipeline calls per configuration")
    w.add_argument("--configs", nargs="+", default=None,
                   help="configurations: dense, method specs, sage, fbc, taylorseer, compile, joined by + "
                   "(default: dense and every method)")  # fmt: skip
    w.add_argument("--timings", nargs="+", choices=bench_pipeline.TIMINGS, default=list(bench_pipeline.TIMINGS),
                   help="cold, warm (first call of a second process), steady (default: all three)")  # fmt: skip
    w.add_argument("--compose", action="store_true", help="time each step kind of the schedule and compose the whole")
    w.add_argument("--measure", action="store_true", help="with --compose: also one full call, compared")
    w.add_argument("--steps", type=_positive, default=50, help="denoising steps (default 50, the pipelines' own)")
    w.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    b.set_defaults(func=commands.cmd_bench)


def _add_search(sub: Any) -> None:
    s = sub.add_parser(
        "search",
        help="offline Sparse-vDiT search: write a per-(layer, head) mode configuration (JSON)",
        description="Offline search of Sparse-vDiT configurations (Chen et al. 2025, §3.3): per transformer, layer "
        "and head, the mode to run (see dit_sparse.methods.svdit_search).",
    )
    s.add_argument("--prompts", nargs="+", required=True, help="prompts, or @FILE with one prompt per line")
    s.add_argument("--out", required=True, help="output JSON (resumed when it exists unfinished)")
    s.add_argument("--seed", type=int, default=0, help="generator seed of each generation (default 0)")
    s.add_argument("--selection", choices=SELECTIONS, default="cost", help="selection rule (default cost)")
    s.add_argument("--error-budget", type=float, default=0.05, help="max relative MSE (selection=cost; default 0.05)")
    s.add_argument("--feed", choices=FEEDS, default="dense", help="output fed to the next layer (default dense)")
    s.add_argument("--layers-per-pass", type=_positive, default=None, help="layers per pass (default all)")
    s.add_argument("--block-size", type=_positive, default=128, help="block size of the modes (default 128)")
    s.add_argument("--no-progress", action="store_true")
    _add_model_args(s, required=True, steps=10)
    s.set_defaults(func=commands.cmd_search)


def _add_generate3d(sub: Any) -> None:
    g = sub.add_parser(
        "generate3d",
        help="generate a 3D shape with the embedded tiny 3D model",
        description="Generate one shape with the embedded tiny text-to-3D model: a .ply mesh (marching cubes, with "
        "scikit-image: pip install 'dit-sparse[3d]') or point cloud, and a preview PNG.",
    )
    g.add_argument("--prompt", required=True, help="'a <small|large> <sphere|cube|cylinder|cone> [at the <place>]'")
    g.add_argument(
        "--method", default="none", help=f"sparse-attention method ({', '.join(available_methods())}) or none"
    )
    g.add_argument("--param", action="append", metavar="KEY=VALUE", help="method hyper-parameter (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--steps", type=_positive, default=24, help="sampling steps (default 24)")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    g.add_argument("--out", help="output .ply (default: <prompt>-<method>-s<seed>.ply); the preview is the .png beside")
    g.add_argument("--force", "--overwrite", action="store_true", help="overwrite existing output files")
    g.add_argument("--model", help="model folder (default: the embedded assets/tiny-3d)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="block-sparse kernel backend (default: auto)")
    g.add_argument("--device", help="cuda, cpu, ... (default: cpu)")
    g.set_defaults(func=commands.cmd_generate3d)


def _bhn(text: str) -> tuple[int, int, int]:
    """``BATCH,HEADS,SEQ_LEN`` of a ``tune`` problem."""
    try:
        b, h, n = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"write BATCH,HEADS,SEQ_LEN (e.g. 2,12,32760), got {text!r}") from None
    if min(b, h, n) < 1:
        raise argparse.ArgumentTypeError(f"BATCH,HEADS,SEQ_LEN must be >= 1, got {text!r}")
    return b, h, n


def _add_tune(sub: Any) -> None:
    t = sub.add_parser(
        "tune",
        help="pre-tune the Triton kernels into the tuning cache (CUDA only)",
        description="Times the kernels' configurations at the given problems and stores the fastest in "
        "$DIT_SPARSE_TUNING_CACHE (default ~/.cache/dit_sparse/tuning), so that a new process skips autotuning.",
    )
    t.add_argument("--shapes", nargs="+", type=_bhn, required=True, help="BATCH,HEADS,SEQ_LEN, e.g. 2,12,32760")
    t.add_argument("--head-dims", nargs="+", type=_positive, default=[128], help="head dims (default 128)")
    t.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16"], default=["bfloat16"])
    t.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.125, 0.0625])
    t.add_argument("--blocks", nargs="+", type=_positive, default=[128], help="block sizes (default 128)")
    t.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["bf16"], help="default bf16")
    t.add_argument(
        "--orders",
        nargs="+",
        choices=["natural", "permuted"],
        default=["natural", "permuted"],
        help="plans in the model's token order and with a token order (draft, svdit); default both",
    )
    t.add_argument("--kernels", nargs="+", choices=list(TUNE_KERNELS), default=list(TUNE_KERNELS),
                   help="attention (every density, order and precision) and block-mass (AdaSpa's search, LSE "
                   "computed and given); default both")  # fmt: skip
    t.add_argument("--export", type=Path, metavar="FOLDER",
                   help="then write the shipped table of this GPU (if any) with this machine's tuning file added "
                   "into FOLDER as a shippable table (GPU name + triton version; the package ships "
                   "dit_sparse/kernels/tuned/)")  # fmt: skip
    t.set_defaults(func=commands.cmd_tune)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="Sparse attention for video diffusion transformers.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_generate, _add_eval, _add_bench, _add_search, _add_tune, _add_generate3d):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dit-sparse`` and ``python -m dit_sparse``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from dit_sparse import __version__  # noqa: PLC0415

        print(f"{PROG} {__version__}")
        return 0
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        _finish(args)
        return int(func(args) or 0)
    except USER_ERRORS as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
