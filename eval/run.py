"""Quality-vs-speed runs: every method against the model's own dense attention, same prompts, seeds and scheduler.

``dit_sparse.eval.run(model=..., methods=["window", "radial"], prompts="builtin", seeds=[0], out="runs/x")``
(or ``dit-sparse eval``) does, for every (prompt, seed):

* the dense reference: the pipeline with its own attention processors, generated once and cached on disk per
  (model, prompt, seed, steps, size, guidance, device, dtype) under ``<out>/dense`` (or ``cache_dir``);
* every method setting through the public API (``dit_sparse.apply`` / ``report`` / ``remove``): PSNR, SSIM and
  LPIPS of its video against the reference, attention-level error (``report().attn_error``), density
  (``SparseReport.effective_density``), attention and transformer time per denoising step, and the speedup against
  the dense transformer time measured in this same process (the latest dense generation; when the references come
  from the cache, dense is generated once more for its timing);
* on the embedded model, ``caption_ok``: whether the method's video still passes the model's caption check (each
  named colour found and moving in the named direction, ``dit_sparse/train/captions.py``); None elsewhere.

Transformer time is measured around every transformer forward (CUDA events on a GPU, wall clock otherwise); the
per-step figure is the median forward time × forwards per step (the median drops the warm-up forward).
Results: ``results.jsonl`` written row by row (a rerun skips the rows it would make again: same model weights,
prompt, seed, method setting, generation settings, dtype, device, backend and error sampling; rows of other
settings are kept, and left out of this run's summary), ``results.csv``, a summary table, ``pareto.png`` (speedup
vs PSNR, one labelled point per setting) and ``videos/`` side by side (dense | sparse | amplified difference) per
prompt and setting, for the first seed. One run at a time per folder (a second one is refused: RunFolderBusy).

The pieces: :mod:`~dit_sparse.eval.settings` (settings, model, prompts, argument checks),
:mod:`~dit_sparse.eval.specs` (method settings), :mod:`~dit_sparse.eval.generation` (one timed video),
:mod:`~dit_sparse.eval.store` (rows file, lock, dense cache), :mod:`~dit_sparse.eval.report` (CSV, tables, plot).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dit_sparse.eval.generation import Generation, fingerprint, generate
from dit_sparse.eval.metrics import LPIPS, caption_ok, psnr, ssim
from dit_sparse.eval.report import fmt, format_table, plot_pareto, summarize, write_csv
from dit_sparse.eval.settings import (
    Settings,
    check_backend,
    check_device,
    check_dtype,
    check_error_sample,
    check_folder,
    check_positive,
    check_seeds,
    complete_settings,
    default_device,
    default_value,
    is_embedded_model,
    load_pipeline,
    read_prompts,
    resolve_model_path,
    resolve_settings,
)
from dit_sparse.eval.specs import MethodSpec, parse_methods
from dit_sparse.eval.store import (
    DenseCache,
    RunFolderBusy,
    RunLock,
    append_row,
    jsonable,
    load_rows,
    repair_tail,
    row_key,
    satisfies,
    video_name,
)
from dit_sparse.eval.video import side_by_side, write_video
from dit_sparse.files import environment

# what the command line (dit_sparse/cli.py) takes from here, beside run
__all__ = [
    "RunFolderBusy",
    "complete_settings",
    "default_value",
    "generate",
    "is_embedded_model",
    "load_pipeline",
    "parse_methods",
    "read_prompts",
    "resolve_model_path",
    "resolve_settings",
    "run",
]


@dataclasses.dataclass
class _Run:
    """What every row of one run shares."""

    pipe: Any
    out: Path
    settings: Settings
    identity: dict[str, Any]  # the key fields every row shares (model, settings, dtype, device, backend)
    error_sample: int
    env: dict[str, Any]
    cache: DenseCache
    metric: LPIPS | None
    check_captions: bool
    log: Callable[[str], None]


def run(
    model: str | Path | Any | None = None,
    methods: str | Iterable[Any] = ("window", "radial"),
    prompts: str | Path | Sequence[str] | None = "builtin",
    seeds: Sequence[int] = (0,),
    out: str | Path = "runs/eval",
    *,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
    fps: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    common_params: dict[str, Any] | None = None,
    backend: str = "auto",
    error_sample: int = 1,
    device: str | None = None,
    dtype: Any = None,
    cache_dir: str | Path | None = None,
    lpips: LPIPS | bool = True,
    videos: bool = True,
    amplify: float = 4.0,
    warmup: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every method on every (prompt, seed) against the dense reference; write and return the rows.

    Every argument is checked before the model is loaded (a ValueError saying what is wrong), and the run folder
    is locked for the whole run (:class:`RunFolderBusy` at once when another run holds it).

    Args:
        model: a local Diffusers pipeline folder (default: the embedded tiny model) or an already built pipeline.
        methods: method specs (``"radial"``, ``"window:window=1,1,1;tile=2,8,8"``, a comma-separated string of
            them, ``(name, params)`` pairs); ``params[name]`` / ``common_params`` are added to them.
        prompts: a list, a text file (one per line) or ``"builtin"``.
        seeds: one video per (prompt, seed); distinct integers >= 0.
        out: the run folder (results.jsonl, results.csv, pareto.png, videos/, dense/).
        steps, frames, height, width, guidance, negative_prompt, max_sequence_length, fps: generation settings
            (default: ``dit_sparse.defaults`` for the embedded model, else the pipeline's own).
        backend: kernel backend handed to ``dit_sparse.apply`` (``dit_sparse.kernels.BACKENDS``).
        error_sample: handed to ``dit_sparse.apply``: every n-th self-attention layer also runs exact attention
            and records the error. It runs in a second, untimed generation of the same video, so that the timed
            one does no extra work (0 turns it off).
        device, dtype: where and how a pipeline loaded from a folder runs (default: cuda if present, else cpu; the
            saved dtype); a built pipeline is used as it is (give neither).
        cache_dir: where dense references are cached (default ``<out>/dense``).
        lpips: an :class:`LPIPS` instance, True (the lpips package's AlexNet) or False (skip LPIPS).
        videos: write the side-by-side videos.
        amplify: gain of the difference panel (> 0).
        warmup: run one untimed denoising step before anything is timed.

    Returns every row of ``results.jsonl`` (finished earlier ones included, those of other settings too).
    """
    out = Path(out)
    specs = parse_methods(methods, params, common_params)
    prompt_list = read_prompts(prompts)
    seed_list = check_seeds(seeds)
    error_sample = check_error_sample(error_sample)
    check_positive("amplify", amplify)
    if not isinstance(lpips, LPIPS | bool):
        raise ValueError(f"lpips must be True, False or an LPIPS instance, got {lpips!r}")
    settings = resolve_settings(
        steps,
        frames,
        height,
        width,
        guidance,
        negative_prompt,
        max_sequence_length,
        fps,
        embedded=is_embedded_model(model),
    )
    built = model is not None and not isinstance(model, str | Path)
    if built:
        if device is not None or dtype is not None:
            raise ValueError("device and dtype are for a pipeline loaded from a folder; move a built one yourself")
        check_backend(backend, getattr(model, "device", "cpu"))
    else:
        path = resolve_model_path(model)
        check_dtype(dtype)
        device = check_device(device) or default_device()
        check_backend(backend, device)
    check_folder("output folder", out)
    if cache_dir is not None:
        check_folder("cache_dir", Path(cache_dir))

    with RunLock(out):
        pipe = model if built else load_pipeline(path, device=device, dtype=dtype)
        r = _start(pipe, model, out, settings, backend, error_sample, cache_dir, lpips, log)
        return _run_locked(r, specs, prompt_list, seed_list, videos, amplify, warmup, progress)


def _start(
    pipe: Any,
    model: Any,
    out: Path,
    settings: Settings,
    backend: str,
    error_sample: int,
    cache_dir: str | Path | None,
    lpips: LPIPS | bool,
    log: Callable[[str], None],
) -> _Run:
    """The shared part of every row, once the pipeline is there."""
    if isinstance(model, str | Path) or model is None:
        model_id = str(resolve_model_path(model))
    else:
        model_id = str(
            getattr(pipe, "name_or_path", None)
            or getattr(getattr(pipe, "config", {}), "_name_or_path", "")
            or type(pipe).__name__
        )
    settings = complete_settings(settings, pipe)
    run_device = str(getattr(pipe, "device", "cpu"))
    env = environment()
    gpu_name = env.pop("device")
    identity = {
        "model_id": model_id,
        "fingerprint": fingerprint(pipe),
        "settings": jsonable(settings.key()),
        "dtype": str(getattr(pipe, "dtype", "")).removeprefix("torch."),
        "device": run_device,
        "device_name": gpu_name if run_device.startswith("cuda") else "cpu",
        "backend": backend,
    }
    metric = lpips if isinstance(lpips, LPIPS) else (LPIPS(device=run_device) if lpips else None)
    cache = DenseCache(cache_dir if cache_dir is not None else out / "dense")
    return _Run(pipe, out, settings, identity, error_sample, env, cache, metric, is_embedded_model(model), log)


def _run_locked(
    r: _Run,
    specs: list[MethodSpec],
    prompt_list: list[str],
    seed_list: list[int],
    videos: bool,
    amplify: float,
    warmup: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    results_path = r.out / "results.jsonl"
    note = repair_tail(results_path)
    if note:
        r.log(f"note: {note}")
    rows = load_rows(results_path, partial(_log_warning, r.log))
    found: dict[str, dict[str, Any]] = {}  # key → the latest row that serves this run
    for row in rows:
        if satisfies(row, r.error_sample):
            found[row_key(row)] = row

    todo = [(p, s, m) for p in prompt_list for s in seed_list for m in specs]
    keys = {(p, s, m.label): row_key(_key_fields(r, p, s, m)) for p, s, m in todo}
    pending = [(p, s, m) for p, s, m in todo if keys[(p, s, m.label)] not in found]
    if len(pending) < len(todo):
        r.log(f"resuming: {len(todo) - len(pending)} of {len(todo)} rows already in {results_path}, skipped")

    references: dict[tuple[str, int], np.ndarray] = {}
    dense_timing: Generation | None = None  # the dense generation timed in this process
    notes: list[str] = []
    if pending and warmup:  # one untimed step: lazy initialisation, allocator, kernel autotuning
        generate(r.pipe, pending[0][0], pending[0][1], dataclasses.replace(r.settings, steps=1), progress=False)
    for i, (prompt, seed, spec) in enumerate(pending, 1):
        if (prompt, seed) not in references:
            references[(prompt, seed)], fresh = _reference(r, prompt, seed, progress)
            dense_timing = fresh or dense_timing  # the latest: closest in time to the rows it is compared with
        if dense_timing is None:  # references all came from the cache: time dense once in this process
            dense_timing = generate(r.pipe, prompt, seed, r.settings, progress=progress, desc="dense (timing)")
            if not np.array_equal(dense_timing.video, references[(prompt, seed)]):
                diff = int(np.abs(dense_timing.video.astype(int) - references[(prompt, seed)].astype(int)).max())
                r.log(
                    f"note: the dense video regenerated for timing differs from the cached one (max |diff| {diff}/255)"
                )
        row, video = _measure(r, prompt, seed, spec, references[(prompt, seed)], dense_timing, progress)
        if videos and seed == seed_list[0]:
            name = video_name(prompt, spec.label, keys[(prompt, seed, spec.label)])
            panels = side_by_side(references[(prompt, seed)], video, amplify=amplify, labels=("dense", spec.label[:28]))
            written, video_note = write_video(r.out / "videos" / name, panels, fps=r.settings.fps)
            row["video"] = str(written.relative_to(r.out))
            if video_note and video_note not in notes:
                notes.append(video_note)
                r.log(f"note: {video_note}")
        append_row(results_path, row)
        rows.append(jsonable(row))
        found[keys[(prompt, seed, spec.label)]] = rows[-1]
        r.log(
            f"[{i}/{len(pending)}] {spec.label} | {prompt!r} seed {seed}: PSNR {fmt(row['psnr'], '.2f')} "
            f"SSIM {fmt(row['ssim'], '.4f')} LPIPS {fmt(row['lpips'], '.4f')} "
            f"density {fmt(row['effective_density'], '.3f')} speedup {fmt(row['speedup'], '.2f')}x"
        )
    return _write_outputs(r, results_path, rows, [found[keys[(p, s, m.label)]] for p, s, m in todo], videos)


def _log_warning(log: Callable[[str], None], message: str) -> None:
    log(f"warning: {message}")


def _key_fields(r: _Run, prompt: str, seed: int, spec: MethodSpec) -> dict[str, Any]:
    fields = {"prompt": prompt, "seed": seed, "label": spec.label, "method": spec.name, "params": spec.params}
    return jsonable({**r.identity, **fields})


def _reference(r: _Run, prompt: str, seed: int, progress: bool) -> tuple[np.ndarray, Generation | None]:
    """The dense video of (prompt, seed) from the cache, else generated (and cached): (video, generation or None)."""
    ident = r.identity
    meta = {k: ident[k] for k in ("model_id", "fingerprint", "settings", "dtype")}
    meta.update(prompt=prompt, seed=seed, device=ident["device"].split(":")[0])
    cached = r.cache.get(meta)
    if cached is not None:
        r.log(f"dense reference from cache: {prompt!r} seed {seed}")
        return cached[0], None
    g = generate(r.pipe, prompt, seed, r.settings, progress=progress, desc=f"dense {prompt[:24]!r} s{seed}")
    r.cache.put(meta, g.video, {"seconds": g.seconds, "forward_ms": g.forward_ms, "timing": g.timing})
    return g.video, g


def _measure(
    r: _Run, prompt: str, seed: int, spec: MethodSpec, ref: np.ndarray, dense: Generation, progress: bool
) -> tuple[dict[str, Any], np.ndarray]:
    """One row (its video not written yet) and the method's video."""
    backend = r.identity["backend"]
    gen_video = partial(
        generate, r.pipe, prompt, seed, r.settings, method=spec.name, params=spec.params, backend=backend
    )
    g = gen_video(progress=progress, desc=f"{spec.label[:24]} s{seed}")
    rep = g.report or {}
    if r.error_sample > 0:  # a second, untimed pass measures the attention error (it runs exact attention too)
        e = gen_video(error_sample=r.error_sample, progress=False)
        rep = {**rep, **{k: (e.report or {}).get(k) for k in ("attn_out_rel_l2", "attn_lse_rel_l2")}}
    dense_ms, sparse_ms = dense.transformer_ms_per_step, g.transformer_ms_per_step
    row = {
        **_key_fields(r, prompt, seed, spec),
        "error_sample": r.error_sample,
        "psnr": psnr(ref, g.video),
        "ssim": ssim(ref, g.video),
        "lpips": r.metric(ref, g.video) if r.metric is not None else None,
        "lpips_status": "skipped" if r.metric is None else r.metric.status,
        "caption_ok": caption_ok(g.video, prompt) if r.check_captions else None,
        "attn_out_rel_l2": rep.get("attn_out_rel_l2"),
        "attn_lse_rel_l2": rep.get("attn_lse_rel_l2"),
        "density": rep.get("density"),
        "effective_density": rep.get("effective_density"),
        "calls": rep.get("calls"),
        "sparse_calls": rep.get("sparse_calls"),
        "dense_calls": rep.get("dense_calls"),
        "attention_ms_per_step": (rep["attention_ms"] / r.settings.steps)
        if rep.get("attention_ms") is not None
        else None,
        "transformer_ms_per_step": sparse_ms,
        "dense_transformer_ms_per_step": dense_ms,
        "speedup": (dense_ms / sparse_ms) if dense_ms and sparse_ms else None,
        "seconds": g.seconds,
        "dense_seconds": dense.seconds,
        "e2e_speedup": dense.seconds / g.seconds if g.seconds else None,
        "timing": g.timing,
        "video": None,
        **r.env,
    }
    return row, g.video


def _write_outputs(
    r: _Run,
    results_path: Path,
    rows: list[dict[str, Any]],
    current: list[dict[str, Any]],
    videos: bool,
) -> list[dict[str, Any]]:
    """results.csv (every row), this run's summary table and pareto.png; returns ``rows``."""
    write_csv(rows, r.out / "results.csv")
    if len(rows) > len(current):
        r.log(f"note: {results_path} also holds {len(rows) - len(current)} row(s) of other settings (kept, not shown)")
    summary = summarize(current)
    r.log(format_table(summary))
    for s in sorted({str(x.get("lpips_status")) for x in current if x.get("lpips") is None}):
        if s.startswith("unavailable"):
            r.log(f"LPIPS {s}")
    st = r.settings
    plot_pareto(
        summary,
        r.out / "pareto.png",
        title=f"{Path(r.identity['model_id']).name} · {st.steps} steps · "
        f"{st.frames or '?'}×{st.height or '?'}×{st.width or '?'} · {r.identity['dtype']}",
    )
    r.log(
        f"wrote {results_path}, {r.out / 'results.csv'}, {r.out / 'pareto.png'}"
        + (f", {r.out / 'videos'}/" if videos else "")
    )
    return rows
