"""Measure the tiny model: VAE PSNR on held-out videos and the caption check on seeded prompts.

    python -m dit_sparse.train.evaluate --model assets/tiny-t2v --out eval.json --strip strip.png
    python -m dit_sparse.train.evaluate --model assets/tiny-t2v --time-cpu      # default-settings timing

``--configs 10:5,10:1`` evaluates several (steps:guidance) settings; the first is the reported one.
``--card`` writes the model card README.md into the model folder from an eval JSON (and a timing JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import defaults
from .captions import check_video
from .data import sample_scenes

EVAL_SEED = 20_000_003  # prompts for the caption check; training draws from other seeds
NOISE_SEED = 1000  # prompt i uses noise seed NOISE_SEED + i


def load_pipeline(model: str | Path, device: str = "cpu"):
    """WanPipeline from a local folder, float32, offline."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(model), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def eval_prompts(n: int, two_objects: bool = False) -> list[str]:
    """The ``n`` seeded evaluation prompts (one object each, or two)."""
    seed = EVAL_SEED + (1 if two_objects else 0)
    return [s.caption for s in sample_scenes(seed, n, two_prob=1.0 if two_objects else 0.0)]


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    steps: int,
    guidance: float,
    frames: int,
    height: int,
    width: int,
    batch: int = 10,
    seed0: int = NOISE_SEED,
) -> np.ndarray:
    """Videos (N, T, H, W, 3) in [0, 1] for ``prompts``; prompt i uses noise seed ``seed0 + i``."""
    dev = pipe._execution_device
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator(device=dev).manual_seed(seed0 + i + j) for j in range(len(chunk))]
        res = pipe(
            prompt=chunk,
            negative_prompt=[""] * len(chunk),
            num_frames=frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        )
        out.append(np.asarray(res.frames, dtype=np.float32))
    return np.concatenate(out)


def caption_agreement(videos: np.ndarray, prompts: list[str]) -> dict:
    """Caption-check summary and per-prompt details."""
    checks = [check_video(v, p) for v, p in zip(videos, prompts, strict=True)]
    return {
        "agreement": sum(c.ok for c in checks) / max(len(checks), 1),
        "n": len(checks),
        "details": [
            {
                "prompt": c.caption,
                "ok": c.ok,
                "objects": [
                    {
                        "colour": o.colour,
                        "direction": o.direction,
                        "detected": o.detected_direction,
                        "found": round(o.found_frames, 2),
                        "motion": [round(m, 3) for m in o.motion],
                    }
                    for o in c.objects
                ],
            }
            for c in checks
        ],
    }


def save_strip(videos: np.ndarray, path: str | Path, n_frames: int = 6, scale: int = 1) -> None:
    """PNG of ``n_frames`` evenly spaced frames per video, one row per video."""
    import imageio.v3 as iio

    t = videos.shape[1]
    idx = np.linspace(0, t - 1, n_frames).round().astype(int)
    rows = [np.concatenate([v[i] for i in idx], axis=1) for v in videos]
    img = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    if scale > 1:
        img = img[::scale, ::scale]
    iio.imwrite(str(path), img, optimize=True) if str(path).endswith(".png") else iio.imwrite(str(path), img)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(defaults.MODEL_PATH))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--n2", type=int, default=20, help="two-object prompts (reported separately)")
    ap.add_argument("--configs", default=f"{defaults.STEPS}:{defaults.GUIDANCE:g}")
    ap.add_argument("--frames", type=int, default=defaults.FRAMES)
    ap.add_argument("--height", type=int, default=defaults.HEIGHT)
    ap.add_argument("--width", type=int, default=defaults.WIDTH)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--psnr-n", type=int, default=16)
    ap.add_argument("--out", default=None, help="results JSON")
    ap.add_argument("--strip", default=None, help="PNG strip of a few generated videos (first config)")
    ap.add_argument("--time-cpu", action="store_true", help="time one default generation on this machine")
    ap.add_argument("--card", default=None, help="eval JSON to write the model card from")
    ap.add_argument("--timing", default=None, help="timing JSON for the card")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    if args.card:
        write_card(
            Path(args.model),
            json.loads(Path(args.card).read_text()),
            json.loads(Path(args.timing).read_text()) if args.timing else None,
        )
        return
    if args.time_cpu:
        t0 = time.time()
        pipe = load_pipeline(args.model, "cpu")
        t1 = time.time()
        gen = torch.Generator().manual_seed(defaults.SEED)
        pipe(
            defaults.PROMPT,
            num_frames=defaults.FRAMES,
            height=defaults.HEIGHT,
            width=defaults.WIDTH,
            num_inference_steps=defaults.STEPS,
            guidance_scale=defaults.GUIDANCE,
            generator=gen,
            output_type="np",
        )
        t2 = time.time()
        res = {
            "load_s": round(t1 - t0, 2),
            "generate_s": round(t2 - t1, 2),
            "threads": torch.get_num_threads(),
            "steps": defaults.STEPS,
            "guidance": defaults.GUIDANCE,
            "frames": defaults.FRAMES,
            "height": defaults.HEIGHT,
            "width": defaults.WIDTH,
        }
        print(json.dumps(res))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return

    from .vae import evaluate_vae

    pipe = load_pipeline(args.model, args.device)
    dev = torch.device(args.device)
    name = f"{torch.cuda.get_device_name(dev)} (CUDA noise generators)" if dev.type == "cuda" else str(dev)
    results: dict = {"device": name, "frames": args.frames, "height": args.height, "width": args.width}
    t0 = time.time()
    score = evaluate_vae(pipe.vae, dev, n=args.psnr_n, frames=args.frames, size=args.height)
    results["vae_psnr_db"] = round(score.psnr, 2)
    results["vae_psnr_thirds_db"] = score.psnr_thirds
    results["vae_psnr_n"] = args.psnr_n
    print(
        f"VAE PSNR {score.psnr:.2f} dB (by third of the clip {score.psnr_thirds}) on {args.psnr_n} held-out videos "
        f"({time.time() - t0:.0f}s)",
        flush=True,
    )
    prompts = eval_prompts(args.n)
    prompts2 = eval_prompts(args.n2, two_objects=True) if args.n2 else []
    results["configs"] = []
    for k, cfg in enumerate(args.configs.split(",")):
        steps, guidance = int(cfg.split(":")[0]), float(cfg.split(":")[1])
        t0 = time.time()
        vids = generate(pipe, prompts + prompts2, steps, guidance, args.frames, args.height, args.width, args.batch)
        one = caption_agreement(vids[: len(prompts)], prompts)
        two = caption_agreement(vids[len(prompts) :], prompts2) if prompts2 else None
        entry = {"steps": steps, "guidance": guidance, "one_object": one, "two_objects": two}
        results["configs"].append(entry)
        msg = f"steps {steps} guidance {guidance}: one-object agreement {one['agreement']:.2f} (n={one['n']})"
        if two:
            msg += f", two-object {two['agreement']:.2f} (n={two['n']})"
        print(msg + f" ({time.time() - t0:.0f}s)", flush=True)
        if k == 0 and args.strip:
            pick = [0, 1, 2] + ([len(prompts)] if prompts2 else [])
            save_strip(vids[pick], args.strip)
            results["strip_prompts"] = [(prompts + prompts2)[i] for i in pick]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def write_card(model_dir: Path, ev: dict, timing: dict | None) -> None:
    """Write README.md (the model card) into ``model_dir`` from the evaluation and timing results."""
    cfg = next(
        (c for c in ev["configs"] if c["steps"] == defaults.STEPS and c["guidance"] == defaults.GUIDANCE),
        ev["configs"][0],
    )
    one, two = cfg["one_object"], cfg["two_objects"]
    others = [c for c in ev["configs"] if c is not cfg]
    sizes = {p.parent.name or ".": 0 for p in model_dir.rglob("*") if p.is_file()}
    for p in model_dir.rglob("*"):
        if p.is_file():
            sizes[p.parent.name or "."] += p.stat().st_size
    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file() and p.name != "README.md")
    lines = [
        "# tiny-t2v: the embedded default model of dit-sparse",
        "",
        "A tiny text-to-video model in the standard Diffusers **Wan** layout (`WanPipeline`: `WanTransformer3DModel`,",
        "`AutoencoderKLWan`, a `UMT5EncoderModel` text encoder, a word-level tokenizer, `UniPCMultistepScheduler`),",
        "trained by this project from scratch on procedurally generated videos of moving shapes. It exists so that",
        "the CLI works offline and the quality numbers of sparse attention mean something (its attention is learned).",
        "",
        "```python",
        "import torch",
        "from diffusers import WanPipeline",
        'pipe = WanPipeline.from_pretrained("assets/tiny-t2v", torch_dtype=torch.float32)',
        f'video = pipe("{defaults.PROMPT}", num_frames={defaults.FRAMES}, height={defaults.HEIGHT},',
        f"             width={defaults.WIDTH}, num_inference_steps={defaults.STEPS}, "
        f"guidance_scale={defaults.GUIDANCE:g}).frames[0]",
        "```",
        "",
        "![generated frames](strip.png)",
        "",
        "Rows (frames evenly spaced over the clip, default settings, noise seeds 1000+i): "
        + "; ".join(f"*{p}*" for p in ev.get("strip_prompts", []))
        + ".",
        "",
        "## What it knows",
        "",
        "Captions follow one grammar: `a <colour> <shape> moving <direction> <speed> [and a <colour> <shape> moving",
        "<direction> <speed>] on a <background> background`, with colours red, green, blue, yellow, purple, cyan,",
        "orange, white; shapes circle, square, triangle; directions left, right, up, down; speeds slowly, quickly;",
        "backgrounds black, gray, brown (plain) and striped, checkered (textured). Anything else is out of",
        "vocabulary (`<unk>`). The generator is `dit_sparse/train/data.py` (seeded, rendered with torch on the fly).",
        "",
        "## Architecture",
        "",
        f"- Default size: {ev['frames']} frames x {ev['height']}x{ev['width']} px -> latent 16 x 16 x 16 -> "
        "**4096 video tokens** per sample (patch 1x1x1).",
        "- Transformer: 4 layers, 4 heads x 64 (dim 256), FFN 768, text dim 128, RoPE; 4.3 M parameters.",
        "- VAE: Wan 2.2-style (`is_residual`, 2x2 patchify), base 32 channels, dim_mult [1, 2, 2], 2 res blocks;",
        "  8x spatial, 4x temporal compression, 16 latent channels (normalised with `latents_mean`/`latents_std`).",
        "- Text encoder: UMT5, 2 layers, d_model 128; tokenizer: word level over the caption vocabulary.",
        "- Scheduler: UniPC, flow prediction, flow_shift 3.",
        f"- Folder size: {total / 2**20:.1f} MiB (float32 safetensors).",
        "",
        "## Quality (measured)",
        "",
        f"- VAE reconstruction PSNR on {ev['vae_psnr_n']} held-out videos ({ev['frames']} frames, "
        f"{ev['height']}x{ev['width']}): **{ev['vae_psnr_db']:.2f} dB** (target >= 30 dB)"
        + (
            f"; by third of the clip {' / '.join(f'{x:.1f}' for x in ev['vae_psnr_thirds_db'])} dB."
            if "vae_psnr_thirds_db" in ev
            else "."
        ),
        "- Caption check (`dit_sparse/train/captions.py`: colour of the moving object and direction of its motion,",
        f"  from the decoded frames) on {one['n']} seeded one-object prompts at the default settings "
        f"({cfg['steps']} steps, guidance {cfg['guidance']:g}): **{100 * one['agreement']:.0f}%** agree "
        "(target >= 80%).",
    ]
    if two:
        lines.append(
            f"- Same check on {two['n']} two-object prompts (both objects must pass): {100 * two['agreement']:.0f}%."
        )
    for c in others:
        lines.append(
            f"- Other setting, {c['steps']} steps, guidance {c['guidance']:g}: one-object "
            f"{100 * c['one_object']['agreement']:.0f}%"
            + (f", two-object {100 * c['two_objects']['agreement']:.0f}%" if c["two_objects"] else "")
        )
    lines.append(f"- Measured on: {ev['device']} (float32, TF32 off); prompts from `evaluate.eval_prompts`.")
    if timing:
        lines += [
            "",
            "## Speed (CPU)",
            "",
            f"- One generation with the package defaults ({timing['steps']} steps, guidance {timing['guidance']:g}, "
            f"{timing['frames']} frames, {timing['height']}x{timing['width']}) on {timing['threads']} CPU threads: "
            f"**{timing['generate_s']:.1f} s** (+ {timing['load_s']:.1f} s loading).",
        ]
        if timing.get("note"):
            lines.append(f"- {timing['note']}")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        "python -m dit_sparse.train.vae --out .work/ckpt/vae --minutes 5       # GPU; resumable",
        "python -m dit_sparse.train.transformer --vae .work/ckpt/vae --out .work/ckpt/t2v --minutes 18 --compile",
        "python -m dit_sparse.train.export --vae .work/ckpt/vae --t2v .work/ckpt/t2v --out assets/tiny-t2v",
        "python -m dit_sparse.train.evaluate --model assets/tiny-t2v --out eval.json --strip assets/tiny-t2v/strip.png",
        "python -m dit_sparse.train.evaluate --model assets/tiny-t2v --time-cpu --out timing.json --device cpu",
        "python -m dit_sparse.train.evaluate --model assets/tiny-t2v --card eval.json --timing timing.json",
        "```",
        "",
        "Each training command resumes from its `--out` folder when rerun; `restore` turns an exported folder back",
        "into training checkpoints. The shipped weights came from (H100, package installed with `pip install",
        "--no-deps .`; `compact` keeps one weight set so checkpoints fit the device's 16 MiB file limit):",
        "",
        "```bash",
        "# release 1 (session 1): VAE 2.8 min, transformer 4.2 + 4.3 + 2.8 min",
        "python -m dit_sparse.train.vae --out ck/vae --minutes 2.8 --batch 32 --frames 9,17 --lr 1.5e-3 --eval-n 16",
        "python -m dit_sparse.train.transformer --vae ck/vae --out ck/t2v --minutes 4.3 --batch 32 --fresh 4 \\",
        "    --fresh-every 1 --prime 256 --lr 6e-4 --init init1   # init1: EMA of an earlier 4.2-min run",
        "python -m dit_sparse.train.compact ck/t2v init5 --keep ema. --half",
        "python -m dit_sparse.train.transformer --vae ck/vae --out ck/t2v2 --minutes 2.8 --batch 32 --fresh 32 \\",
        "    --fresh-every 8 --prime 2048 --lr 6e-4 --warmup 100 --init init5",
        "# release 2 (session 2), from release 1: decoder-only VAE fine-tune (the encoder and so the latent space stay)",
        "# run side by side with the transformer on the same GPU, then the transformer alone",
        "python -m dit_sparse.train.restore --model assets/tiny-t2v --vae ck/vae0 --t2v ck/t2v0",
        "python -m dit_sparse.train.vae --init ck/vae0 --out ck/vae --decoder-only --object-weight 5 --batch 32 \\",
        "    --frames 9,17 --lr 5e-4 --minutes 6 &",
        "python -m dit_sparse.train.transformer --vae ck/vae0 --out ck/t2v --init ck/t2v0 --minutes 6 --batch 32 \\",
        "    --lr 4e-4 --warmup 100 --prime 512",
        "python -m dit_sparse.train.export --vae ck/vae --t2v ck/t2v --out assets/tiny-t2v",
        "python -m dit_sparse.train.restore --model assets/tiny-t2v --vae ck/vae1 --t2v ck/t2v1",
        "python -m dit_sparse.train.transformer --vae ck/vae1 --out ck/t2v2 --init ck/t2v1 --minutes 7.6 --batch 32 \\",
        "    --lr 5e-4 --warmup 100 --prime 512",
        "python -m dit_sparse.train.export --vae ck/vae1 --t2v ck/t2v2 --out assets/tiny-t2v",
        "# release 3 (session 4), from release 2: full VAE fine-tune on long clips (a VAE trained on 9/17 frames",
        "# decoded frames past ~20 at 17-25 dB), latent statistics kept; then the transformer on the new latents,",
        "# compiled, object-weighted loss, in three runs (1,332 + 5,983 + 4,121 steps)",
        "python -m dit_sparse.train.restore --model assets/tiny-t2v --vae ck/vae0 --t2v ck/t2v0",
        "python -m dit_sparse.train.vae --init ck/vae0 --out ck/vae --minutes 5 --batch 8 --frames 33,61 --lr 3e-4 \\",
        "    --object-weight 2 --keep-stats --eval-n 16",
        "python -m dit_sparse.train.transformer --vae ck/vae --out ck/t2v1 --init ck/t2v0 --minutes 2.4 --prime 512 \\",
        "    --lr 4e-4 --compile",
        "python -m dit_sparse.train.compact ck/t2v1 init1 --keep ema. --half",
        "python -m dit_sparse.train.transformer --vae ck/vae --out ck/t2v2 --init init1 --minutes 8.5 --lr 4e-4 --compile",
        "python -m dit_sparse.train.compact ck/t2v2 init2 --keep ema. --half",
        "python -m dit_sparse.train.transformer --vae ck/vae --out ck/t2v3 --init init2 --minutes 7.25 --lr 3e-4 --compile",
        "python -m dit_sparse.train.export --vae ck/vae --t2v ck/t2v3 --out assets/tiny-t2v",
        "```",
        "",
        "Licence: Apache-2.0, like the package. Trained only on synthetic data.",
    ]
    if ev.get("notes"):
        at = lines.index("## Reproduce")
        lines[at:at] = ["## Status and training history", "", *[f"- {n}" for n in ev["notes"]], ""]
    (model_dir / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
