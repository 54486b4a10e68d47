"""Whole generations as users time them: a complete pipeline call per configuration, side by side (CUDA only).

Models (:data:`PIPELINES`): Wan2.1-1.3B at 480p and 720p (81 frames), Wan2.1-14B at 720p (WanPipeline, UniPC flow
scheduler, shift 3, guidance 5: two CFG passes per step, fp32 Wan VAE) and HunyuanVideo at 720p/129 frames
(HunyuanVideoPipeline, flow-match Euler, distilled guidance 6: one pass per step, bf16 VAE with tiling): the
full transformers (no block subset) with random weights from the published configs (:mod:`dit_sparse.bench.models`),
the pipeline's own scheduler, step count and CFG, the VAE decode. Prompt embeddings are given, so the text encoder
is not timed (no text-encoder weights here).

Configurations (:func:`parse_config`): parts joined by ``+``: ``dense`` (the model's own processors, cuDNN/flash
SDPA through torch), a method spec (``radial``, ``window:window=1,1,1``), ``sage`` (the ``sageattention`` package's
``sageattn`` on every self-attention SDPA call), a Diffusers step cache (``fbc``: FirstBlockCache, threshold 0.05;
``taylorseer``: TaylorSeerCache, compute every 5 steps after 3 full ones, first-order prediction of every transformer
block's output (:data:`TAYLORSEER_BLOCKS`: Diffusers 0.42.1's default patterns such as ``^blocks.*attn`` are
full matches and hook none of Wan's ``blocks.N.attn1`` / ``attn2``, so its defaults change nothing); MagCache needs calibrated
ratios we lack and FasterCache a batched CFG pass Wan does not run), ``compile`` (regional
``compile_repeated_blocks``, inductor, ``dynamic=False``; after the method is applied). A combination that cannot
work is refused with its reason (a results row, the run goes on), as is a configuration that fails while running.

Timings (``timings``): ``cold``: the first call of a new process with empty ``TRITON_CACHE_DIR``,
``TORCHINDUCTOR_CACHE_DIR`` and ``DIT_SPARSE_TUNING_CACHE`` (Triton JIT, autotuning, compilation included);
``steady``: the second call of that process; ``warm``: the first call of a second process sharing those folders
(caches warm from the first). Each call: denoising (``output_type="latent"``) and the VAE decode, timed apart;
peak GPU memory of the denoising.

Composition (``compose=True``): per configuration, one process times each kind of step of its schedule
(:mod:`dit_sparse.bench.compose`), the pipeline without the transformer (a stub forward: scheduler steps, CFG
combination, latent preparation) and one VAE decode, and composes the whole; ``measure=True`` also runs one real
full call in the same process and prints ``composed X s, measured Y s, diff Z%``. The process starts on empty
caches, so it also composes the cold generation: the steady whole, plus each kind's first forward's excess over
its steady time (:func:`~dit_sparse.bench.compose.cold_penalty_s`), with the process's first VAE decode in place of
a steady one. Step caches decide at run time which steps to skip: they are not composed (their row says so).

Results go to ``<out>.json`` and ``<out>.md`` after every configuration (a cut-off run keeps what it finished);
progress lines are printed as it goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dit_sparse.bench.models import MODELS

NOTE = (
    "random weights (published configs, full models); prompt embeddings given, text encoder not timed; the "
    "pipeline's own scheduler, steps and CFG"
)
STEP_CACHES = ("fbc", "taylorseer")
TAYLORSEER_BLOCKS = r"(blocks|transformer_blocks|single_transformer_blocks)\.\d+"
"""The modules whose outputs TaylorSeer predicts: every transformer block (Wan, HunyuanVideo)."""
TIMINGS = ("cold", "warm", "steady")


@dataclass(frozen=True)
class PipelineModel:
    """A whole-pipeline benchmark model: the transformer (``bench.MODELS`` key), shape, pipeline family."""

    model: str
    shape: str
    family: str  # "wan" or "hunyuan"

    @property
    def passes(self) -> tuple[str, ...]:
        """CFG passes per step as the pipeline runs them (Wan: guidance 5; HunyuanVideo: distilled guidance)."""
        return ("cond", "uncond") if self.family == "wan" else ("cond",)


PIPELINES: dict[str, PipelineModel] = {
    "wan2.1-1.3b-480p": PipelineModel("wan2.1-1.3b", "480p", "wan"),
    "wan2.1-1.3b-720p": PipelineModel("wan2.1-1.3b", "720p", "wan"),
    "wan2.1-14b-720p": PipelineModel("wan2.1-14b", "720p", "wan"),
    "hunyuanvideo-720p": PipelineModel("hunyuanvideo", "720p", "hunyuan"),
}


class ConfigError(ValueError):
    """A configuration that cannot work (its reason is the message)."""


@dataclass(frozen=True)
class Config:
    """One configuration: an optional method (name, params), step cache, sage, compile."""

    text: str
    method: tuple[str, dict[str, Any]] | None = None
    cache: str | None = None
    sage: bool = False
    compile: bool = False

    @property
    def composable(self) -> str | None:
        """None when the schedule alone fixes every step's work, else why it does not."""
        if self.cache is not None:
            return f"{self.cache} decides at run time which steps it skips: time it whole (without --compose)"
        return None


def parse_config(text: str) -> Config:
    """``"radial+fbc"`` → :class:`Config`; :class:`ConfigError` naming what cannot work together."""
    from dit_sparse.methods import parse_method_spec

    method, cache, sage, comp = None, None, False, False
    for part in filter(None, (p.strip() for p in text.split("+"))):
        if part == "dense":
            continue
        if part == "sage":
            sage = True
        elif part == "compile":
            comp = True
        elif part in STEP_CACHES:
            if cache is not None:
                raise ConfigError(f"{text}: one step cache at a time ({cache} and {part} both skip steps)")
            cache = part
        else:
            try:
                parsed = parse_method_spec(part)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    f"{text}: {part!r} is neither a method nor one of dense, sage, compile, {', '.join(STEP_CACHES)} "
                    f"({e})"
                ) from None
            if method is not None:
                raise ConfigError(f"{text}: one sparse method at a time ({method[0]} and {parsed[0]})")
            method = parsed
    if sage and method is not None:
        raise ConfigError(f"{text}: sage is dense INT8 attention for every self-attention call; the method "
                          f"{method[0]} already replaces those calls")  # fmt: skip
    if not text.strip():
        raise ConfigError("empty configuration")
    return Config(text, method, cache, sage, comp)


# ------------------------------------------------------------------------------------------------ building


def build_pipeline(pm: PipelineModel, device: torch.device) -> Any:
    """The pipeline of ``pm`` with the full random-weight transformer (bf16) and VAE; no text encoders."""
    from dit_sparse.bench.models import build_model

    spec = dataclasses.replace(MODELS[pm.model], subset={}, quick_subset={})
    transformer = build_model(spec, device, torch.bfloat16)
    torch.manual_seed(0)
    if pm.family == "wan":
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

        vae = AutoencoderKLWan().to(device=device, dtype=torch.float32).eval()
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    vae = AutoencoderKLHunyuanVideo().to(device=device, dtype=torch.bfloat16).eval()
    vae.enable_tiling()
    return HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip


def call_kwargs(pm: PipelineModel, device: torch.device, steps: int, seed: int) -> dict[str, Any]:
    """Keyword arguments of one pipeline call: the shape, steps, guidance, given prompt embeddings, latent output."""
    frames, height, width = MODELS[pm.model].shapes[pm.shape]
    g = torch.Generator(device="cpu").manual_seed(0)
    kw: dict[str, Any] = dict(height=height, width=width, num_frames=frames, num_inference_steps=steps,
                              output_type="latent", generator=torch.Generator(device="cpu").manual_seed(seed))  # fmt: skip
    if pm.family == "wan":
        kw.update(prompt_embeds=torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16),
                  negative_prompt_embeds=torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16),
                  guidance_scale=5.0)  # fmt: skip
    else:
        from dit_sparse.bench.models import HUNYUAN_PROMPT_TOKENS, HUNYUAN_TEXT_TOKENS

        mask = torch.zeros(1, HUNYUAN_TEXT_TOKENS, dtype=torch.long)
        mask[:, :HUNYUAN_PROMPT_TOKENS] = 1
        kw.update(prompt_embeds=torch.randn(1, HUNYUAN_TEXT_TOKENS, 4096, generator=g).to(device, torch.bfloat16),
                  pooled_prompt_embeds=torch.randn(1, 768, generator=g).to(device, torch.bfloat16),
                  prompt_attention_mask=mask.to(device), guidance_scale=6.0)  # fmt: skip
    return kw


class SageSDPA:
    """``sageattention.sageattn`` (INT8 Q·Kᵀ) for every self-attention SDPA call of at least 1,024 tokens (the pip
    release's plug-in recipe), as a torch function mode around the pipeline call."""

    def __new__(cls) -> Any:
        import torch.nn.functional as F
        from sageattention import sageattn
        from torch.overrides import TorchFunctionMode

        from dit_sparse.processor import _sdpa_args

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                kwargs = kwargs or {}
                if func is F.scaled_dot_product_attention:
                    q, k, v, mask, dropout_p, is_causal, scale, _ = _sdpa_args(*args, **kwargs)
                    if q.shape[-2] == k.shape[-2] >= 1024 and mask is None and not is_causal and dropout_p == 0.0:
                        return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)
                return func(*args, **kwargs)

        return _Mode()


def configure(pipe: Any, pm: PipelineModel, config: Config) -> Callable[[], contextlib.AbstractContextManager]:
    """Apply ``config`` to ``pipe`` (method, then step cache, then compile); returns what each call runs inside."""
    import dit_sparse
    from dit_sparse.bench.forward import compile_model

    if config.method is not None:
        dit_sparse.apply(pipe, config.method[0], **config.method[1])
    if config.cache == "fbc":
        from diffusers import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    elif config.cache == "taylorseer":
        from diffusers import TaylorSeerCacheConfig

        pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_identifiers=[TAYLORSEER_BLOCKS]))
    if config.compile:
        compile_model(pipe.transformer, MODELS[pm.model], "blocks")
    if config.sage:
        mode = SageSDPA()
        return lambda: mode
    return contextlib.nullcontext


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_s(pipe: Any, latents: torch.Tensor) -> float:
    """Seconds of the VAE decode of ``latents`` the way the pipeline decodes them (Wan: de-normalised latents)."""
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        z = latents.to(pipe.vae.dtype)
        if hasattr(pipe.vae.config, "latents_mean") and pipe.vae.config.latents_mean is not None:
            mean = torch.tensor(pipe.vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1).to(z.dtype)
            std = torch.tensor(pipe.vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1).to(z.dtype)
            z = z * std + mean
        else:
            z = z / pipe.vae.config.scaling_factor
        pipe.vae.decode(z, return_dict=False)
    _sync()
    return time.perf_counter() - t0


def timed_call(pipe: Any, kwargs: dict[str, Any], context: Callable[[], Any]) -> tuple[dict[str, Any], torch.Tensor]:
    """One pipeline call: denoising seconds, its peak GPU memory (GiB), the latents, and how the Triton kernels
    found their launch configurations during the call (:func:`tuning_since`)."""
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    marks = tuning_marks()
    t0 = time.perf_counter()
    with context():
        latents = pipe(**kwargs).frames
    _sync()
    row = {"denoise_s": time.perf_counter() - t0}
    if torch.cuda.is_available():
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row.update(tuning_since(marks))
    return row, latents


TUNED_KERNELS = ("dit_sparse.kernels.triton_attention", "dit_sparse.kernels.block_mass")
"""Modules whose ``TUNER`` picks launch configurations on first use (the attention kernel, AdaSpa's block mass)."""


def tuning_marks() -> dict[str, int]:
    """How long each kernel's tuning log is now (a module never imported has tuned nothing)."""
    return {name: len(sys.modules[name].TUNER.log) for name in TUNED_KERNELS if name in sys.modules}


def tuning_since(marks: dict[str, int]) -> dict[str, Any]:
    """Keys the kernels found since ``marks``: ``tuned_keys`` timed now, ``stored_keys`` read from the tuning file or
    the shipped table (a key counted once per kernel), and ``tuned`` (``"kernel key"`` of each timed key: what a
    shipped table lacks)."""
    new = [(sys.modules[name].TUNER.kernel, e) for name in TUNED_KERNELS if name in sys.modules
           for e in sys.modules[name].TUNER.log[marks.get(name, 0):]]  # fmt: skip
    tuned = sorted({f"{kernel} {e['key']}" for kernel, e in new if "cached" not in e})
    return {
        "tuned_keys": len(tuned),
        "stored_keys": len({(kernel, str(e["key"])) for kernel, e in new if "cached" in e}),
        "tuned": tuned,
    }


def rest_s(pipe: Any, kwargs: dict[str, Any]) -> float:
    """Seconds of a pipeline call whose transformer returns zeros at once: everything but the forwards."""
    transformer = pipe.transformer
    transformer.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states),)
    try:
        timed_call(pipe, kwargs, contextlib.nullcontext)
        return timed_call(pipe, kwargs, contextlib.nullcontext)[0]["denoise_s"]
    finally:
        del transformer.forward


# ------------------------------------------------------------------------------------------------ tiny simulation


def tiny_transformer(family: str) -> tuple[Any, dict[str, Any]]:
    """A tiny random transformer of ``family``'s class (1,024 video tokens: sparse by every method's policy) and its
    forward kwargs, made the way the full model's inputs are (:mod:`dit_sparse.bench.models`); CPU, fp32."""
    from dit_sparse.bench.models import _hunyuan_inputs, _wan_inputs

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    if family == "wan":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()  # fmt: skip
        return model, _wan_inputs(model, (13, 256, 256), cpu, torch.float32)[0]
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()  # fmt: skip
    return model, _hunyuan_inputs(model, (13, 256, 256), cpu, torch.float32)[0]


def schedule_of(pm: PipelineModel, config: Config, scheduler: Any, steps: int) -> tuple[Any, list[int]]:
    """(Schedule, skeleton steps) of ``config`` on ``pm``'s pipeline: from the method's own code on a tiny model of
    the same class (:func:`dit_sparse.bench.compose.step_kinds`); one kind when there is no method."""
    from dit_sparse.bench.compose import dense_schedule, step_kinds

    if config.method is None:
        return dense_schedule(steps, pm.passes), [0]
    tiny, inputs = tiny_transformer(pm.family)
    sched = type(scheduler).from_config(scheduler.config)
    params = {k: v for k, v in config.method[1].items() if k != "precision"}  # the schedule is the same; the CPU
    return step_kinds(tiny, sched, inputs, config.method[0], params, steps, pm.passes)  # model has no fp8 kernel


# ------------------------------------------------------------------------------------------------ worker (one process)


def _report_fields(pipe: Any) -> dict[str, Any]:
    import dit_sparse
    from dit_sparse.state import get_tracker

    if get_tracker(pipe.transformer) is None:
        return {}
    rep = dit_sparse.report(pipe, reset=True)
    return {"density": float(rep.effective_density), "dense_steps": rep.dense_steps, "num_steps": rep.num_steps}


def worker(job: dict[str, Any], out: Path) -> None:
    """One configuration in this (new) process; writes ``out`` (JSON) after every call (partial results)."""
    pm, config = PIPELINES[job["pipeline"]], parse_config(job["config"])
    device = torch.device("cuda")
    result: dict[str, Any] = {"config": config.text, "calls": []}

    def save() -> None:
        out.write_text(json.dumps(result))

    t0 = time.perf_counter()
    pipe = build_pipeline(pm, device)
    result["build_s"] = time.perf_counter() - t0
    kwargs = call_kwargs(pm, device, job["steps"], 0)
    if job.get("compose"):
        _compose_worker(pipe, pm, config, kwargs, job, result, save)
        return
    context = configure(pipe, pm, config)
    for i in range(job["calls"]):
        row, latents = timed_call(pipe, {**kwargs, "generator": torch.Generator("cpu").manual_seed(i)}, context)
        row.update(call=i, decode_s=decode_s(pipe, latents), **_report_fields(pipe))
        result["calls"].append(row)
        save()
        print(f"   {config.text} call {i}: denoise {row['denoise_s']:.1f} s, decode {row['decode_s']:.1f} s, "
              f"peak {row.get('peak_gib', 0):.1f} GiB", flush=True)  # fmt: skip


def _compose_worker(pipe: Any, pm: PipelineModel, config: Config, kwargs: dict, job: dict, result: dict,
                    save: Callable[[], None]) -> None:  # fmt: skip
    from dit_sparse.bench.compose import cold_penalty_s, compose, time_kinds

    steps = job["steps"]
    result["rest_s"] = rest_s(pipe, kwargs)
    schedule, skeleton = schedule_of(pm, config, pipe.scheduler, steps)
    print(f"   {config.text}: kinds {schedule.counts()}, skeleton steps {skeleton}", flush=True)
    context = configure(pipe, pm, config)
    pipe.scheduler.set_timesteps(steps, device=pipe.device)  # the tracker reads num_steps from the scheduler
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    spec = MODELS[pm.model]
    inputs, _ = spec.make_inputs(pipe.transformer, spec.shapes[pm.shape], pipe.device, torch.bfloat16)
    first: list[tuple[str, float]] = []
    marks = tuning_marks()
    with context():
        kind_ms = time_kinds(pipe.transformer, timesteps, schedule, skeleton, inputs, job["repeats"], first=first)
    result.update(tuning_since(marks))  # all in the untimed (cold) pass: the timed ones find every key
    _report_fields(pipe)
    result.update(
        kinds=[
            {"kind": k, "forwards": n, "forward_ms": kind_ms[k], "steps": schedule.steps_of(k)}
            for k, n in schedule.counts().items()
        ],  # fmt: skip
        skeleton=skeleton,
        composed_denoise_s=compose(schedule, kind_ms, result["rest_s"]),
        cold_penalty_s=cold_penalty_s(first, kind_ms),
    )
    save()
    latents = torch.randn(1, 16, *_latent_grid(pm), device=pipe.device)
    result["decode_cold_s"] = decode_s(pipe, latents)  # the process's first decode; the next one is steady
    if job.get("measure"):
        row, latents = timed_call(pipe, kwargs, context)
        row.update(decode_s=decode_s(pipe, latents), **_report_fields(pipe))
        result["calls"].append(row)
        result["measured_denoise_s"] = row["denoise_s"]
        result["diff_pct"] = 100.0 * (result["composed_denoise_s"] / row["denoise_s"] - 1.0)
        result["decode_s"] = row["decode_s"]
    else:
        result["decode_s"] = decode_s(pipe, latents)
    save()
    print(f"   {config.text}: {composition_line(result)}", flush=True)


def _latent_grid(pm: PipelineModel) -> tuple[int, int, int]:
    frames, height, width = MODELS[pm.model].shapes[pm.shape]
    return ((frames - 1) // 4 + 1, height // 8, width // 8)


def composition_line(r: dict[str, Any]) -> str:
    """``composed X s, measured Y s, diff Z%`` (``measured -`` when no full run was made)."""
    if r.get("measured_denoise_s") is None:
        return f"composed {r['composed_denoise_s']:.1f} s, measured - (no full run)"
    return (f"composed {r['composed_denoise_s']:.1f} s, measured {r['measured_denoise_s']:.1f} s, "
            f"diff {r['diff_pct']:+.1f}%")  # fmt: skip


# ------------------------------------------------------------------------------------------------ the run


def _launch(job: dict[str, Any], env: dict[str, str], timeout: float | None) -> dict[str, Any]:
    """Run one worker process; its result, or a failure row with the reason (exit status, the error's last lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "dit_sparse.bench.pipeline", json.dumps(job), str(part)]
        try:
            proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True, timeout=timeout)
            err = proc.stderr
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired as e:
            err, rc = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), "timeout"
        result = json.loads(part.read_text()) if part.exists() else {"config": job["config"], "calls": []}
    if rc != 0:
        tail = [line for line in err.strip().splitlines() if line.strip()][-3:]
        result["error"] = f"process exit {rc}: {' / '.join(tail)}"[:1000]
        sys.stderr.write(err[-4000:])
    return result


def failed_row(config: str, reason: str) -> dict[str, Any]:
    """The results row of a configuration that could not run."""
    return {"config": config, "calls": [], "error": reason}


def run_config(
    pm_name: str, config: str, steps: int, timings: tuple[str, ...], compose: bool, measure: bool, repeats: int,
    timeout: float | None = None, launch: Callable[..., dict[str, Any]] = _launch,
) -> dict[str, Any]:  # fmt: skip
    """One configuration's row: its processes (cold caches in fresh folders; the warm one shares them)."""
    try:
        cfg = parse_config(config)
    except ConfigError as e:
        return failed_row(config, str(e))
    if compose and cfg.composable:
        return failed_row(config, f"not composable: {cfg.composable}")
    base = {"pipeline": pm_name, "config": config, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TRITON_CACHE_DIR=f"{tmp}/triton", TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor",
                   DIT_SPARSE_TUNING_CACHE=f"{tmp}/tuning")  # fmt: skip
        if compose:
            return {**launch({**base, "compose": True, "measure": measure, "repeats": repeats}, env, timeout)}
        first = launch({**base, "calls": 2 if "steady" in timings else 1}, env, timeout)
        row = {"config": config, "build_s": first.get("build_s"), "calls": first["calls"], "timings": {}}
        if first.get("error"):
            row["error"] = first["error"]
        calls = first["calls"]
        if calls:
            row["timings"]["cold"] = calls[0]
        if "steady" in timings and len(calls) > 1:
            row["timings"]["steady"] = calls[1]
        if "warm" in timings and not row.get("error"):
            second = launch({**base, "calls": 1}, env, timeout)
            if second["calls"]:
                row["timings"]["warm"] = second["calls"][0]
            if second.get("error"):
                row["error"] = second["error"]
        if "cold" not in timings:
            row["timings"].pop("cold", None)
    return row


def check_args(pipelines: list[str], configs: list[str], timings: list[str], steps: int) -> None:
    """Refuse unknown models / timings and an empty list before anything runs (configurations are checked per row)."""
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise ValueError(f"unknown pipeline model(s) {', '.join(unknown)}; known: {', '.join(PIPELINES)}")
    bad = [t for t in timings if t not in TIMINGS]
    if bad:
        raise ValueError(f"unknown timing(s) {', '.join(bad)}; choose among {', '.join(TIMINGS)}")
    if not configs:
        raise ValueError("no configuration given; e.g. dense radial sage fbc radial+compile")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def run(
    pipelines: list[str],
    configs: list[str],
    out: str | Path,
    *,
    steps: int = 50,
    timings: tuple[str, ...] = TIMINGS,
    compose: bool = False,
    measure: bool = False,
    repeats: int = 2,
    command: str = "",
    overwrite: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Every configuration on every pipeline model; results written after each one (see the module docstring)."""
    from dit_sparse.bench.results import write_pipeline_results

    check_args(pipelines, configs, list(timings), steps)
    out = Path(out)
    if not overwrite and out.with_suffix(".json").exists():
        raise FileExistsError(f"{out.with_suffix('.json')} exists; choose another --out or pass --overwrite")
    if not torch.cuda.is_available():
        raise RuntimeError("bench --pipeline times whole generations on full-size models and needs an NVIDIA GPU; "
                           f"no CUDA device is visible here (torch {torch.__version__})")  # fmt: skip
    payload: dict[str, Any] = {"command": command or " ".join(sys.argv), "note": NOTE, "steps": steps,
                               "mode": "compose" if compose else "pipeline", "timings": list(timings), "runs": []}  # fmt: skip
    for name in pipelines:
        entry = {"pipeline": name, **dataclasses.asdict(PIPELINES[name]), "rows": []}
        payload["runs"].append(entry)
        for i, config in enumerate(configs, 1):
            print(f"== {name} [{i}/{len(configs)}] {config}", flush=True)
            row = run_config(name, config, steps, tuple(timings), compose, measure, repeats, timeout)
            if row.get("error"):
                print(f"!! {name} {config}: {row['error']}", flush=True)
            entry["rows"].append(row)
            write_pipeline_results(payload, out)
    return payload


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m dit_sparse.bench.pipeline JOB_JSON OUT_JSON``."""
    job, out = argv if argv is not None else sys.argv[1:]
    worker(json.loads(job), Path(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
