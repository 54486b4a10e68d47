"""What each ``dit-sparse`` command does once its arguments are parsed (``dit_sparse.cli`` parses them).

Every command checks what it can before loading a model (:mod:`dit_sparse.preflight`, :mod:`dit_sparse.estimate`):
output file, model folder, device and backend, and the size of the run.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from dit_sparse.estimate import check_estimate, estimate_run, pipeline_call_defaults
from dit_sparse.files import slug
from dit_sparse.pipelines import supported_models
from dit_sparse.preflight import CLIError, check_device, check_model_folder, check_output, verify_written


def _check_size(args: argparse.Namespace, folder: Path, settings: Any, target: Any, backend: str, **kw: Any) -> None:
    """Refuse (or warn about) a run too large for ``target`` before loading it, unless ``--ignore-estimate``."""
    if args.ignore_estimate:
        return
    defaults = pipeline_call_defaults(folder)
    est = estimate_run(
        folder,
        frames=settings.frames or defaults.get("num_frames"),
        height=settings.height or defaults.get("height"),
        width=settings.width or defaults.get("width"),
        steps=settings.steps or defaults.get("num_inference_steps", 50),
        guidance=settings.guidance if settings.guidance is not None else defaults.get("guidance_scale"),
        device=target,
        dtype=args.dtype,
        backend=backend,
        **kw,
    )
    warning = check_estimate(est) if est is not None else None
    if warning:
        print(warning, file=sys.stderr)


def _settings(args: argparse.Namespace, folder: Path, steps: int | None = None) -> Any:
    from dit_sparse.eval.run import is_embedded_model, resolve_settings  # noqa: PLC0415

    return resolve_settings(
        steps if steps is not None else args.steps, args.frames, args.height, args.width,
        getattr(args, "guidance", None), getattr(args, "negative_prompt", None), fps=getattr(args, "fps", None),
        embedded=is_embedded_model(folder),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ generate


def _generate_rank(args: argparse.Namespace) -> int | None:
    """``--gpus N``: the rank of a process torchrun started (its GPU becomes ``--device``); None otherwise."""
    if args.gpus == 1:
        return None
    from dit_sparse.parallel import launched_rank  # noqa: PLC0415

    if args.device not in (None, "cuda"):
        raise CLIError(f"--gpus {args.gpus} runs on cuda:0..{args.gpus - 1}: leave out --device {args.device}")
    rank = launched_rank()
    if rank is not None:
        args.device = f"cuda:{rank}"
    return rank


def _launch_generate(args: argparse.Namespace) -> int:
    """Run this ``generate`` command once per GPU under torchrun (Ulysses context parallelism)."""
    from dit_sparse.parallel import launch  # noqa: PLC0415

    try:
        return launch(args.gpus, sys.argv[1:])
    except ValueError as exc:
        raise CLIError(f"--gpus {args.gpus}: {exc}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate one video with a sparse-attention method and write it as MP4 (GIF fallback)."""
    from dit_sparse.eval.run import complete_settings, default_value, generate, load_pipeline  # noqa: PLC0415
    from dit_sparse.eval.video import ffmpeg_available, write_video  # noqa: PLC0415

    if args.prompt is None:
        args.prompt = default_value(("PROMPT",), None)
        if args.prompt is None:
            raise CLIError("no prompt given")
    if args.seed is None:
        args.seed = int(default_value(("SEED",), 0))
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    out = Path(args.out) if args.out else Path(f"{slug(args.prompt, 40, 'video')}-{args.method}-s{args.seed}.mp4")
    check_output(out, (".mp4", ".gif"), args.force)
    if out.suffix.lower() != ".gif" and not ffmpeg_available()[0]:
        check_output(out.with_suffix(".gif"), (".gif",), args.force)  # where the video will go instead
    folder = check_model_folder(args.model, supported_models())
    rank = _generate_rank(args)
    target, backend = check_device(args.device, args.backend)
    settings = _settings(args, folder)
    _check_size(args, folder, settings, target, backend, sparse=args.method != "none")
    if args.gpus > 1 and rank is None:
        return _launch_generate(args)

    t0 = time.perf_counter()
    pipe = load_pipeline(folder, device=str(target), dtype=args.dtype)
    if rank is not None:
        from dit_sparse.parallel import enable_context_parallel  # noqa: PLC0415

        enable_context_parallel(pipe, args.gpus)
    load_s = time.perf_counter() - t0
    settings = complete_settings(settings, pipe)
    params = args.params
    g = generate(
        pipe, args.prompt, args.seed, settings, method=args.method, params=params, backend=args.backend,
        progress=not args.quiet, desc=f"{args.method} step", leave=True,
    )  # fmt: skip
    if rank not in (None, 0):
        return 0  # every rank holds the same video: rank 0 writes it
    try:
        written, note = write_video(out, g.video, fps=settings.fps)
    except OSError as exc:
        raise CLIError(f"could not write the video to {str(out)!r}: {exc}") from None
    verify_written(written)
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


def cmd_generate3d(args: argparse.Namespace) -> int:
    """Generate one shape with the tiny 3D model: a .ply (mesh or point cloud) and a preview .png beside it."""
    import torch  # noqa: PLC0415

    from dit_sparse.model3d import generate, model, shapes  # noqa: PLC0415

    try:
        shapes.parse(args.prompt)
    except ValueError as e:
        raise CLIError(str(e)) from None
    out = Path(args.out) if args.out else Path(f"{slug(args.prompt, 40, 'shape')}-{args.method}-s{args.seed}.ply")
    check_output(out, (".ply",), args.force)
    preview = check_output(out.with_suffix(".png"), (".png",), args.force, flag="the preview of --out")
    try:
        net = model.load(args.model, device=args.device or "cpu")
    except (FileNotFoundError, RuntimeError) as e:
        raise CLIError(f"cannot load the 3D model: {e}") from None
    if args.method != "none":
        generate.make_sparse(net, args.method, args.params, backend=args.backend)
    t0 = time.perf_counter()
    volume = generate.sample(net, [args.prompt], args.seed, args.steps, args.guidance)[0]
    seconds = time.perf_counter() - t0
    vertices, faces = generate.surface(volume)
    generate.write_ply(out, vertices, faces)
    generate.write_preview(preview, volume, args.prompt)
    verify_written(out)
    kind = f"mesh, {len(faces)} triangles" if faces is not None else f"point cloud, {len(vertices)} occupied cells"
    print(
        f"wrote {out} ({kind}) and {preview}; {seconds:.2f} s for {args.steps} steps on {torch.device(net.pos.device)}"
    )
    if args.method != "none":
        import dit_sparse  # noqa: PLC0415

        print(dit_sparse.report(net))
    return 0


# ------------------------------------------------------------------------------------------------ eval


def cmd_eval(args: argparse.Namespace) -> int:
    """Quality-vs-speed run (``dit_sparse.eval.run``)."""
    from dit_sparse.eval.run import read_prompts, run  # noqa: PLC0415

    try:
        prompts = read_prompts(args.prompts)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--prompts: {e}") from None
    folder = check_model_folder(args.model, supported_models())
    target, backend = check_device(args.device, args.backend)
    generations = (len(args.specs) + 1) * len(prompts) * len(args.seed_list)  # each method + the dense reference
    _check_size(args, folder, _settings(args, folder), target, backend, generations=generations)
    out = args.out or f"runs/eval-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run(
        model=args.model, methods=args.specs, prompts=prompts, seeds=args.seed_list, out=out, steps=args.steps,
        frames=args.frames, height=args.height, width=args.width, guidance=args.guidance,
        negative_prompt=args.negative_prompt, fps=args.fps, backend=args.backend, error_sample=args.error_sample,
        device=args.device, dtype=args.dtype, cache_dir=args.cache_dir, lpips=not args.no_lpips,
        videos=not args.no_videos, amplify=args.amplify, progress=not args.quiet,
    )  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ bench


def cmd_bench(args: argparse.Namespace) -> int:
    """Transformer-forward timing on full-size architectures (CUDA only), delegated to ``dit_sparse.bench.run``."""
    import torch  # noqa: PLC0415

    from dit_sparse import bench  # noqa: PLC0415

    if args.pipeline:
        return _bench_pipeline(args)
    if not torch.cuda.is_available():
        raise CLIError(
            "bench times CUDA kernels on full-size models and needs an NVIDIA GPU; no CUDA device is "
            f"visible here (torch {torch.__version__}). Use `dit-sparse eval` on the CPU."
        )
    out = args.out or (
        f"benchmarks/results/e2e-{datetime.date.today().isoformat()}{'-quick' if args.quick else ''}"
        f"{'' if args.compile == 'none' else '-compile-' + args.compile}"
    )
    kwargs = {"quick": args.quick} | ({"compile": args.compile} if args.compile != "none" else {})
    bench.run(args.models, args.shapes, args.methods, args.repeats or 5, out, "dit-sparse " + shlex.join(sys.argv[1:]),
              **kwargs)  # fmt: skip
    return 0


def pipeline_models(models: list[str] | None, shapes: list[str] | None) -> list[str]:
    """The whole-pipeline benchmark models (``bench.pipeline.PIPELINES``) of ``models`` x ``shapes`` (default
    Wan2.1-1.3B, every shape it has); a CLIError for a model or shape without a whole-pipeline entry."""
    from dit_sparse.bench.pipeline import PIPELINES  # noqa: PLC0415

    models = models or ["wan2.1-1.3b"]
    chosen = [n for n, pm in PIPELINES.items() if pm.model in models and (not shapes or pm.shape in shapes)]
    missing = [m for m in models if not any(PIPELINES[n].model == m for n in chosen)]
    if missing:
        known = ", ".join(f"{pm.model} {pm.shape}" for pm in PIPELINES.values())
        raise CLIError(f"no whole-pipeline benchmark for {', '.join(missing)}"
                       f"{' at ' + ', '.join(shapes) if shapes else ''}; known: {known}")  # fmt: skip
    return chosen


def _bench_pipeline(args: argparse.Namespace) -> int:
    """``bench --pipeline``: whole generations per configuration (``dit_sparse.bench.pipeline.run``)."""
    import torch  # noqa: PLC0415

    from dit_sparse.bench import pipeline  # noqa: PLC0415
    from dit_sparse.methods import available_methods  # noqa: PLC0415

    chosen = pipeline_models(args.models, args.shapes)
    configs = args.configs or ["dense", *(m for m in available_methods() if m not in ("dense", "svdit"))]
    out = args.out or (
        f"benchmarks/results/pipeline-{datetime.date.today().isoformat()}{'-compose' if args.compose else ''}"
    )
    if not args.overwrite and Path(out).with_suffix(".json").exists():
        raise CLIError(f"{Path(out).with_suffix('.json')} exists; choose another --out or pass --overwrite")
    if not torch.cuda.is_available():
        raise CLIError(
            "bench --pipeline times whole generations on full-size models and needs an NVIDIA GPU; no CUDA device "
            f"is visible here (torch {torch.__version__}). Use `dit-sparse eval` on the CPU."
        )
    print(f"bench --pipeline: {', '.join(chosen)}; {pipeline.NOTE}", flush=True)
    pipeline.run(chosen, configs, out, steps=args.steps, timings=tuple(args.timings), compose=args.compose,
                 measure=args.measure, repeats=args.repeats or 2, command="dit-sparse " + shlex.join(sys.argv[1:]),
                 overwrite=args.overwrite)  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ search


def read_search_prompts(items: list[str]) -> list[str]:
    """Prompts from the command line; ``@FILE`` items add one prompt per non-empty line of FILE."""
    prompts: list[str] = []
    for item in items:
        if not item.startswith("@"):
            prompts.append(item)
            continue
        try:
            prompts.extend(line.strip() for line in Path(item[1:]).read_text().splitlines() if line.strip())
        except OSError as exc:
            raise CLIError(f"--prompts {item}: cannot read {item[1:]!r} ({exc.strerror or exc})") from None
    if not prompts:
        raise CLIError("--prompts: no prompt given")
    return prompts


def cmd_search(args: argparse.Namespace) -> int:
    """Offline Sparse-vDiT search (:func:`dit_sparse.search`) on a local pipeline; writes the configuration."""
    from dit_sparse.eval.run import load_pipeline  # noqa: PLC0415
    from dit_sparse.methods.svdit import config_sections  # noqa: PLC0415
    from dit_sparse.methods.svdit_search import SearchSettings  # noqa: PLC0415
    from dit_sparse.offline_search import search  # noqa: PLC0415

    prompts = read_search_prompts(args.prompts)
    out = check_output(Path(args.out), (".json",), overwrite=True)  # an unfinished search there is resumed
    folder = check_model_folder(args.model, supported_models())
    target, backend = check_device(args.device, args.backend)
    settings = SearchSettings(error_budget=args.error_budget, selection=args.selection, feed=args.feed)
    generations = len(prompts) * (1 + len(settings.candidates))  # dense and every candidate, every call
    _check_size(args, folder, _settings(args, folder), target, backend, generations=generations)
    dtype = args.dtype or ("bfloat16" if target.type == "cuda" else "float32")
    pipe = load_pipeline(folder, device=str(target), dtype=dtype)
    call = {k: v for k, v in (("height", args.height), ("width", args.width), ("num_frames", args.frames)) if v}
    data = search(
        pipe, prompts, out, steps=args.steps, settings=settings, layers_per_pass=args.layers_per_pass,
        seed=args.seed, backend=args.backend, block_size=args.block_size, progress=not args.no_progress, **call,
    )  # fmt: skip
    for name, section in config_sections(data).items():
        counts: dict[str, int] = {}
        for modes in section["layers"].values():
            for mode in modes:
                counts[mode] = counts.get(mode, 0) + 1
        dens = section.get("density", {})
        mean = sum(dens.values()) / len(dens) if dens else float("nan")
        print(f"{name}: {len(section['layers'])} layers, modes {counts}, mean density {mean:.3f}")
    print(f"wrote {verify_written(out)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Pre-tune the Triton kernels (:func:`dit_sparse.tune.tune`); one line per problem."""
    import torch  # noqa: PLC0415

    from dit_sparse.kernels.tuning_cache import cache_path, export_table, table_stamp  # noqa: PLC0415
    from dit_sparse.tune import TuneError, tune  # noqa: PLC0415

    if args.export is not None and cache_path(args.export, table_stamp()).exists():  # before the tuning, not after
        raise TuneError(f"{cache_path(args.export, table_stamp())} exists; remove it or choose another folder")
    rows = tune(
        args.shapes,
        args.head_dims,
        [getattr(torch, d) for d in args.dtypes],
        args.densities,
        blocks=args.blocks,
        precisions=args.precisions,
        permuted=[order == "permuted" for order in dict.fromkeys(args.orders)],
        kernels=args.kernels,
    )
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    if args.export is not None:
        print(f"wrote {export_table(args.export)}")
    return 0
