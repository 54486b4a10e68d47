"""The ``dit-sparse`` command: ``generate``, ``eval``, ``bench`` and ``search``.

    dit-sparse generate "a red circle moving right" --method radial [--model PATH] [--steps N] [--seed S]
        [--frames F --height H --width W] [--guidance G] [--out video.mp4] [--force] [--param key=value ...]
    dit-sparse eval --methods dense,window,radial --prompts FILE|builtin --seeds 0,1 --out runs/NAME
    dit-sparse bench [--models ...] [--methods ...] [--quick] [--compile none|blocks|full]   (CUDA only)
    dit-sparse search ...                                     (offline search of static methods, where present)

``python -m dit_sparse`` is the same command. Errors in the arguments are reported before any model is loaded.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "dit-sparse"


class CLIError(Exception):
    """A user error: printed as ``dit-sparse <command>: error: ...`` with exit status 2."""


# ------------------------------------------------------------------------------------------------ helpers

_KEY = re.compile(r"^[A-Za-z_]\w*$")


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["window=1,1,1", "dense_steps=2"]`` → ``{"window": (1, 1, 1), "dense_steps": 2}`` (Python literals)."""
    from dit_sparse.methods.base import parse_value  # noqa: PLC0415

    params: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key) or not value.strip():
            raise CLIError(f"bad --param {item!r}: write key=value (e.g. --param window=1,1,1 --param dense_steps=2)")
        params[key] = parse_value(value.strip())
    return params


def check_method(name: str, params: dict[str, Any]) -> None:
    """Raise :class:`CLIError` unless ``name`` is a registered method (or ``none``) taking ``params``."""
    from dit_sparse.methods import available_methods, make_config  # noqa: PLC0415

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
        make_config(name, params)
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


def _positive(kind: type) -> Any:
    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v

    conv.__name__ = f"positive {kind.__name__}"
    return conv


def _check_model(model: str | None) -> None:
    from dit_sparse.eval.run import resolve_model_path  # noqa: PLC0415

    try:
        resolve_model_path(model)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Diffusers pipeline folder (default: the embedded tiny model)")
    p.add_argument("--steps", type=_positive(int), help="denoising steps (default: the model's default)")
    p.add_argument("--frames", type=_positive(int), help="frames of the video")
    p.add_argument("--height", type=_positive(int), help="height in pixels")
    p.add_argument("--width", type=_positive(int), help="width in pixels")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--negative-prompt", help="negative prompt")
    p.add_argument("--fps", type=_positive(int), help="frames per second of the written video")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "triton", "flex", "reference"],
        help="block-sparse kernel backend (default: auto)",
    )
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="load the pipeline in this dtype")


# ------------------------------------------------------------------------------------------------ generate


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate one video with a sparse-attention method and write it as MP4 (GIF fallback)."""
    from dit_sparse.eval.run import default_value  # noqa: PLC0415
    from dit_sparse.eval.video import ffmpeg_available  # noqa: PLC0415

    params = parse_params(args.param)
    check_method(args.method, params)
    if args.prompt is None:
        args.prompt = default_value(("PROMPT",), None)
        if args.prompt is None:
            raise CLIError("no prompt given")
    if args.seed is None:
        args.seed = int(default_value(("SEED",), 0))
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    out = Path(args.out) if args.out else Path(f"{_slug(args.prompt)}-{args.method}-s{args.seed}.mp4")
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise CLIError(f"--out {str(out)!r}: the video is written as .mp4 (or .gif)")
    ok, why = ffmpeg_available()
    target = out if ok or out.suffix.lower() == ".gif" else out.with_suffix(".gif")
    for path in {out, target}:
        if path.exists() and not args.force:
            raise CLIError(f"{str(path)!r} exists; pass --force to overwrite it")
    _check_model(args.model)

    from dit_sparse.eval.run import (  # noqa: PLC0415
        complete_settings,
        generate,
        is_embedded_model,
        load_pipeline,
        resolve_settings,
    )
    from dit_sparse.eval.video import write_video  # noqa: PLC0415

    settings = resolve_settings(
        args.steps,
        args.frames,
        args.height,
        args.width,
        args.guidance,
        args.negative_prompt,
        fps=args.fps,
        embedded=is_embedded_model(args.model),
    )
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    settings = complete_settings(settings, pipe)
    g = generate(
        pipe,
        args.prompt,
        args.seed,
        settings,
        method=args.method,
        params=params,
        backend=args.backend,
        progress=not args.quiet,
        desc=f"{args.method} step",
        leave=True,
    )
    written, note = write_video(out, g.video, fps=settings.fps)
    if note:
        print(f"note: {note}")
    rep = g.report
    print(f"method: {args.method}" + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""))
    print(
        f"time: {g.seconds:.2f} s for {settings.steps} steps (model load {load_s:.1f} s); "
        f"transformer {g.transformer_ms_per_step:.1f} ms/step ({g.timing})"
        if g.transformer_ms_per_step is not None
        else f"time: {g.seconds:.2f} s"
    )
    if rep is not None:
        dens, sparse, dense = rep.get("density"), rep.get("sparse_calls") or 0, rep.get("dense_calls") or 0
        if not sparse:
            print(
                f"density: 1.000 (no sparse call: all {dense} self-attention calls ran dense by policy: "
                "dense_steps, dense_layers or min_seq_len; see --param)"
            )
        else:
            print(f"density: {dens:.3f} over {sparse} sparse self-attention calls ({dense} left dense by policy)")
    else:
        print("density: 1.000 (the model's own dense attention)")
    print(f"video: {written} ({g.video.shape[0]} frames, {g.video.shape[2]}x{g.video.shape[1]})")
    return 0


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:n] or "video"


# ------------------------------------------------------------------------------------------------ eval


def cmd_eval(args: argparse.Namespace) -> int:
    """Quality-vs-speed run (``dit_sparse.eval.run``)."""
    from dit_sparse.eval.run import parse_methods, read_prompts, run  # noqa: PLC0415

    common = parse_params(args.param)
    try:
        specs = parse_methods(",".join(args.methods), common=common)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--methods: {e}") from None
    seeds = parse_seeds(args.seeds)
    try:
        prompts = read_prompts(args.prompts)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--prompts: {e}") from None
    _check_model(args.model)
    out = args.out or f"runs/eval-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run(
        model=args.model,
        methods=specs,
        prompts=prompts,
        seeds=seeds,
        out=out,
        steps=args.steps,
        frames=args.frames,
        height=args.height,
        width=args.width,
        guidance=args.guidance,
        negative_prompt=args.negative_prompt,
        fps=args.fps,
        backend=args.backend,
        error_sample=args.error_sample,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        lpips=not args.no_lpips,
        videos=not args.no_videos,
        amplify=args.amplify,
        progress=not args.quiet,
    )
    return 0


# ------------------------------------------------------------------------------------------------ bench


def _bench_module() -> Any:
    try:
        return importlib.import_module("dit_sparse.bench")
    except ImportError:
        return None


def cmd_bench(args: argparse.Namespace) -> int:
    """Transformer-forward timing on full-size architectures (CUDA only), delegated to ``dit_sparse.bench.run``."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise CLIError(
            "bench times CUDA kernels on full-size models and needs an NVIDIA GPU; no CUDA device is "
            f"visible here (torch {torch.__version__}). Use `dit-sparse eval` on the CPU."
        )
    bench = _bench_module()
    if bench is None or not hasattr(bench, "run"):
        raise CLIError("this build of dit-sparse has no benchmark (dit_sparse.bench.run is missing)")
    for m in args.methods or []:
        name, _, rest = m.partition(":")
        check_method(name.strip(), {})  # names only here; bench.run checks the settings
    quick, compile_mode = getattr(args, "quick", False), getattr(args, "compile", "none")
    out = args.out or (
        f"benchmarks/results/e2e-{datetime.date.today().isoformat()}{'-quick' if quick else ''}"
        f"{'' if compile_mode == 'none' else '-compile-' + compile_mode}"
    )
    kwargs = {"quick": quick} | ({"compile": compile_mode} if compile_mode != "none" else {})
    bench.run(args.models, args.shapes, args.methods, args.repeats, out, "dit-sparse " + shlex.join(sys.argv[1:]),
              **kwargs)  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ parser


def _method_names() -> list[str]:
    from dit_sparse.methods import available_methods  # noqa: PLC0415

    return available_methods()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="Sparse attention for video diffusion transformers.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="generate a video with a sparse-attention method",
        description="Generate one video with a sparse-attention method.",
    )
    g.add_argument("prompt", nargs="?", default=None, help="text prompt (default: the embedded model's example)")
    g.add_argument(
        "--method",
        required=True,
        help=f"sparse-attention method ({', '.join(_method_names())}), or 'none' for the model's own attention",
    )
    g.add_argument("--param", action="append", metavar="KEY=VALUE", help="method hyper-parameter (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: the model's default, else 0)")
    g.add_argument("--out", help="output video (.mp4; default: <prompt>-<method>-s<seed>.mp4)")
    g.add_argument("--force", action="store_true", help="overwrite an existing output file")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_generation_args(g)
    g.set_defaults(func=cmd_generate)

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
        type=int,
        default=1,
        help="attention error on every n-th layer, in an extra untimed pass (0: off; default 1)",
    )
    e.add_argument("--cache-dir", help="dense reference cache (default <out>/dense)")
    e.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    e.add_argument("--no-videos", action="store_true", help="skip the side-by-side videos")
    e.add_argument("--amplify", type=float, default=4.0, help="gain of the difference panel (default 4)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_generation_args(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench",
        help="speed on full-size architectures (CUDA only)",
        description="Transformer-forward timing, dense vs methods, on full-size video DiTs (CUDA only).",
    )
    bench = _bench_module()
    models = sorted(getattr(bench, "MODELS", {})) if bench is not None else []
    b.add_argument("--models", nargs="+", default=None, choices=models or None, help="models (default: the first)")
    b.add_argument("--shapes", nargs="+", default=None, help="shape names, e.g. 480p 720p (default: all)")
    b.add_argument("--methods", nargs="+", default=None, help="method specs, e.g. window radial:decay=0.2")
    b.add_argument("--repeats", type=_positive(int), default=5, help="timed repeats (median; default 5)")
    b.add_argument("--quick", action="store_true", help="light pass: fewer repeats and blocks (see dit_sparse.bench)")
    b.add_argument(
        "--compile",
        default="none",
        choices=list(getattr(bench, "COMPILE_MODES", ("none",))),
        help="also time dense and each method compiled: blocks (regional) or full, next to eager",
    )
    b.add_argument("--out", help="results prefix (default benchmarks/results/e2e-<date>[-quick][-compile-<mode>])")
    b.set_defaults(func=cmd_bench)

    try:
        search = importlib.import_module("dit_sparse.search")
    except ImportError:
        search = None
    if search is not None and hasattr(search, "add_cli"):
        search.add_cli(sub)
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
        return int(func(args) or 0)
    except CLIError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        if os.environ.get("DIT_SPARSE_DEBUG"):
            raise
        print(
            f"{PROG} {args.command}: error: {type(e).__name__}: {e} (set DIT_SPARSE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
