"""Whole generations as users time them: a complete ``WanPipeline`` call per configuration (GPU).

Random-weight Wan2.1 transformer (published config) and Wan VAE (fp32, as the pipeline runs it), UniPC flow
scheduler, the pipeline's own step count and CFG; prompt embeddings are given (no text-encoder weights here, so the
text encoder is not timed). Each configuration runs in a new process with an empty Triton cache: its first call is
the cold one (Triton JIT and autotuning included), the following calls are steady state. Dense (the model's own
processors, cuDNN SDPA through torch), every method at its defaults, the ``sageattention`` package (its Triton
``sageattn`` on every self-attention SDPA call, the pip release's plug-in recipe) and Diffusers' FirstBlockCache
side by side, ratios against dense from the same run.

    python benchmarks/pipeline.py --configs dense radial sage fbc --shape 480p --out benchmarks/results/pipeline-X
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dit_sparse.processor import _sdpa_args

SHAPES = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
CONFIGS = ("dense", "radial", "window", "draft", "adaspa", "rettention", "sage", "fbc", "radial+fbc")


class SageSDPA(TorchFunctionMode):
    """``sageattention.sageattn`` (INT8 Q·Kᵀ) for every self-attention SDPA call of at least 1,024 tokens."""

    def __init__(self) -> None:
        super().__init__()
        from sageattention import sageattn

        self.sageattn = sageattn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, dropout_p, is_causal, scale, _ = _sdpa_args(*args, **kwargs)
            if q.shape[-2] == k.shape[-2] >= 1024 and mask is None and not is_causal and dropout_p == 0.0:
                return self.sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)
        return func(*args, **kwargs)


def build_pipeline(model: str, device: torch.device) -> Any:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from dit_sparse.bench import MODELS, build_model

    transformer = build_model(MODELS[model], device, torch.bfloat16)
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to(device=device, dtype=torch.float32).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)


def configure(pipe: Any, config: str) -> Any:
    """Apply a configuration; returns the context manager the calls run in (or None)."""
    import dit_sparse

    parts = config.split("+")
    for part in parts:
        if part == "fbc":
            from diffusers import FirstBlockCacheConfig

            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
        elif part == "sage":
            return SageSDPA()
        elif part != "dense":
            dit_sparse.apply(pipe, part)
    return None


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (new) process: ``--calls`` generations, each timed whole."""
    import contextlib

    import dit_sparse
    from dit_sparse.state import get_tracker

    device = torch.device("cuda")
    frames, height, width = SHAPES[args.shape]
    t0 = time.perf_counter()
    pipe = build_pipeline(args.model, device)
    build_s = time.perf_counter() - t0
    mode = configure(pipe, args.worker)
    g = torch.Generator(device="cpu").manual_seed(0)
    embeds = torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16)
    negative = torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16)
    calls = []
    for i in range(args.calls):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with mode if mode is not None else contextlib.nullcontext():
            latents = pipe(
                prompt_embeds=embeds, negative_prompt_embeds=negative, height=height, width=width, num_frames=frames,
                num_inference_steps=args.steps, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator(device="cpu").manual_seed(i),
            ).frames  # fmt: skip
        torch.cuda.synchronize()
        denoise = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30
        row: dict[str, Any] = {"call": i, "denoise_s": denoise, "peak_gib": peak}
        if i == 0 and args.decode:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                z = latents.to(pipe.vae.dtype)
                mean = torch.tensor(pipe.vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
                std = 1.0 / torch.tensor(pipe.vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
                pipe.vae.decode(z / std + mean, return_dict=False)
            torch.cuda.synchronize()
            row["decode_s"] = time.perf_counter() - t0
        if get_tracker(pipe.transformer) is not None:
            rep = dit_sparse.report(pipe, reset=True)
            row.update(density=rep.effective_density, dense_steps=rep.dense_steps, num_steps=rep.num_steps)
        calls.append(row)
        print(json.dumps({"config": args.worker, **row}), flush=True)
    return {"config": args.worker, "build_s": build_s, "calls": calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["dense", "radial"], choices=CONFIGS)
    p.add_argument("--model", default="wan2.1-1.3b")
    p.add_argument("--shape", default="480p", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--calls", type=int, default=2, help="generations per configuration (the first is cold)")
    p.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(args)
        Path(args.out).write_text(json.dumps(result))
        return 0
    if not torch.cuda.is_available():
        p.error("needs an NVIDIA GPU")
    from dit_sparse.files import atomic_write_json, atomic_write_text, environment

    results = []
    for i, config in enumerate(args.configs):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(
                os.environ, TRITON_CACHE_DIR=str(Path(tmp) / "triton"), TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "ind")
            )
            part = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--worker", config, "--model", args.model, "--shape", args.shape,
                   "--steps", str(args.steps), "--calls", str(args.calls), "--out", str(part)]  # fmt: skip
            if i == 0:
                cmd.append("--decode")
            subprocess.run(cmd, env=env, check=True)
            results.append(json.loads(part.read_text()))
    dense = next((r for r in results if r["config"] == "dense"), None)
    payload = {
        "environment": environment(),
        "command": " ".join(sys.argv),
        "model": args.model,
        "shape": args.shape,
        "steps": args.steps,
        "note": "random weights; prompt embeddings given (text encoder not timed); fp32 VAE; guidance 5; each "
        "configuration in a new process with an empty Triton cache: call 0 is cold, later calls steady",
        "results": results,
    }
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), payload)
    lines = [
        f"# Whole generation, {args.model} {args.shape} {args.steps} steps",
        "",
        f"{payload['environment']['device']}, torch {payload['environment']['torch']}, "
        f"diffusers {payload['environment']['diffusers']}, {payload['environment']['date']}. {payload['note']}.",
        f"Command: `{payload['command']}`",
        "",
        "| config | density | cold s | steady s | cold vs dense | steady vs dense | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cold, steady = r["calls"][0], r["calls"][-1]
        d_cold = dense["calls"][0]["denoise_s"] if dense else float("nan")
        d_steady = dense["calls"][-1]["denoise_s"] if dense else float("nan")
        density = steady.get("density")
        lines.append(
            f"| {r['config']} | {'' if density is None else f'{density:.3f}'} | {cold['denoise_s']:.1f} | "
            f"{steady['denoise_s']:.1f} | {d_cold / cold['denoise_s']:.2f}x | {d_steady / steady['denoise_s']:.2f}x | "
            f"{max(c['peak_gib'] for c in r['calls']):.1f} |"
        )
    if results and "decode_s" in results[0]["calls"][0]:
        lines += ["", f"VAE decode (fp32, once): {results[0]['calls'][0]['decode_s']:.1f} s, not in the columns above."]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
