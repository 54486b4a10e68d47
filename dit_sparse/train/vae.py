"""Train the tiny AutoencoderKLWan for reconstruction on procedural videos (resumable).

    python -m dit_sparse.train.vae --out .work/ckpt/vae --minutes 4

Resumes from ``--out`` when it holds a checkpoint. At the end it measures PSNR on held-out videos at the
default size and the per-channel latent statistics (stored in the checkpoint's meta.json, later written
into the VAE config as ``latents_mean`` / ``latents_std``).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data
from .common import Clock, load_optimizer_tensors, log, lr_at, optimizer_tensors, psnr
from .model import build_vae, load_checkpoint, prefixed, save_checkpoint, unprefixed

HELD_OUT_SEED = 10_000_019  # seeds for held-out videos; training uses seeds < 10**7


@dataclass
class VAEScore:
    """Held-out reconstruction quality and the latent statistics of the held-out videos."""

    psnr: float  # mean PSNR (dB) over videos
    psnr_thirds: list[float]  # mean PSNR over the first, middle and last third of the frames
    latents_mean: torch.Tensor  # per channel
    latents_std: torch.Tensor  # per channel


@torch.no_grad()
def evaluate_vae(vae, device: torch.device, n: int = 16, frames: int = 61, size: int = 128, batch: int = 4) -> VAEScore:
    """Encode-decode ``n`` held-out videos; PSNR overall and by third of the clip (late frames drift first)."""
    vae.eval()
    scores, thirds, lat = [], [], []
    for i in range(0, n, batch):
        k = min(batch, n - i)
        video, _ = data.batch(HELD_OUT_SEED + i, k, frames, size, size, device)
        z = vae.encode(video).latent_dist.mode()
        rec = vae.decode(z).sample
        scores.append(psnr(rec, video))
        thirds.append(torch.stack([psnr(r, v) for r, v in zip(rec.chunk(3, 2), video.chunk(3, 2), strict=True)], 1))
        lat.append(z.float().transpose(0, 1).flatten(1))
    z_all = torch.cat(lat, 1)
    by_third = torch.cat(thirds).mean(0).tolist()
    return VAEScore(
        torch.cat(scores).mean().item(), [round(x, 2) for x in by_third], z_all.mean(1).cpu(), z_all.std(1).cpu()
    )


def vae_latent_size(size: int) -> int:
    """Latent side length for a ``size``-pixel frame (8x spatial compression)."""
    return size // 8


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".work/ckpt/vae")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--frames",
        default="33,61",
        help="clip lengths to mix (comma-separated, 4k+1); train up to the longest clip you decode: a VAE "
        "trained on 9/17 frames decoded frames past ~20 at 17-25 dB instead of 34",
    )
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=1e-6)
    ap.add_argument("--save-every", type=float, default=90.0, help="seconds between checkpoints")
    ap.add_argument("--eval-n", type=int, default=16)
    ap.add_argument("--eval-frames", type=int, default=61)
    ap.add_argument("--init", default=None, help="start from these VAE weights (fresh optimizer and step)")
    ap.add_argument(
        "--decoder-only",
        action="store_true",
        help="fine-tune the decoder on frozen-encoder latents (keeps the latent space)",
    )
    ap.add_argument(
        "--object-weight", type=float, default=0.0, help="extra loss weight on pixels covered by (or next to) objects"
    )
    ap.add_argument(
        "--keep-stats",
        action="store_true",
        help="keep the --init latent statistics, so that a transformer trained on them stays valid",
    )
    ap.add_argument("--crop", type=int, default=0, help="decoder-only: train on random latent crops of this size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    vae = build_vae().to(dev)
    names = {id(p): n for n, p in vae.named_parameters()}
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    meta: dict = {}
    try:
        tensors, meta = load_checkpoint(args.out)
        vae.load_state_dict(unprefixed(tensors, "model."))
        step = int(meta["step"])
        n = load_optimizer_tensors(opt, names, tensors, step)
        log(f"resumed from {args.out} at step {step} ({n} optimizer states)")
    except FileNotFoundError:
        log("starting from scratch")
        if args.init:
            init, init_meta = load_checkpoint(args.init)
            vae.load_state_dict(unprefixed(init, "model."))
            meta.update({k: init_meta[k] for k in ("latents_mean", "latents_std") if k in init_meta})
            log(f"initialised weights from {args.init}")
    if args.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        opt = torch.optim.AdamW(
            [p for p in vae.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0
        )
        if step:
            load_optimizer_tensors(opt, names, tensors, step)
    nparams = sum(p.numel() for p in vae.parameters())
    log(f"VAE params {nparams / 1e6:.2f}M on {dev}")

    def save() -> None:
        meta.update(step=step, kind="vae")
        tensors = prefixed(vae.state_dict(), "model.")
        tensors.update(optimizer_tensors(opt, names))
        save_checkpoint(args.out, tensors, meta)

    clock = Clock(args.minutes)
    last_save = clock.elapsed
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    rng = random.Random(step)
    frame_choices = [int(f) for f in str(args.frames).split(",")]
    vae.train()
    while not clock.done():
        frames = rng.choice(frame_choices)
        scenes = data.sample_scenes(step * 7919 + 1, args.batch, two_prob=0.4)
        video, coverage = data.render_with_coverage(scenes, frames, args.size, args.size, dev)
        weight = torch.ones_like(video[:, :1])
        if args.object_weight:
            mask = (coverage > 0).float()
            weight = 1 + args.object_weight * F.max_pool3d(mask, (1, 5, 5), 1, (0, 2, 2))
        for g in opt.param_groups:
            g["lr"] = lr_at(args.lr, step, clock.frac)
        with torch.autocast(**amp):
            if args.decoder_only:
                with torch.no_grad():
                    z = vae.encode(video).latent_dist.mode()
                kl = torch.zeros((), device=dev)
                if args.crop and args.crop < z.shape[-1]:
                    y0, x0 = rng.randrange(z.shape[-2] - args.crop + 1), rng.randrange(z.shape[-1] - args.crop + 1)
                    z = z[..., y0 : y0 + args.crop, x0 : x0 + args.crop]
                    f = args.size // vae_latent_size(args.size)
                    sl = (..., slice(y0 * f, (y0 + args.crop) * f), slice(x0 * f, (x0 + args.crop) * f))
                    video, weight = video[sl], weight[sl]
            else:
                post = vae.encode(video).latent_dist
                z = post.sample()
                kl = post.kl().mean() / z[0].numel()
            rec = vae.decode(z).sample
        rec = rec.float()
        wn = weight / weight.mean()
        mse = (wn * (rec - video) ** 2).mean()
        l1 = (wn * (rec - video).abs()).mean()
        loss = mse + 0.5 * l1 + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in vae.parameters() if p.requires_grad], 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == 1:
            p = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-12)).item()
            log(f"step {step} t={clock.elapsed:.0f}s loss {loss.item():.5f} psnr~{p:.2f} kl {kl.item():.3f}")
        if clock.elapsed - last_save > args.save_every:
            save()
            last_save = clock.elapsed
    score = evaluate_vae(vae, dev, n=args.eval_n, frames=args.eval_frames, size=args.size)
    meta.update(
        psnr_heldout=score.psnr, psnr_thirds=score.psnr_thirds, psnr_n=args.eval_n, psnr_frames=args.eval_frames
    )
    if not ((args.decoder_only or args.keep_stats) and "latents_mean" in meta):
        meta.update(
            latents_mean=[round(x, 5) for x in score.latents_mean.tolist()],
            latents_std=[round(x, 5) for x in score.latents_std.tolist()],
        )
    save()
    log(
        f"done: step {step}, held-out PSNR {score.psnr:.2f} dB (by third of the clip {score.psnr_thirds}) "
        f"on {args.eval_n} videos of {args.eval_frames} frames"
    )


if __name__ == "__main__":
    main()
