"""Train the tiny WanTransformer3DModel (and its UMT5 text encoder) with rectified flow (resumable).

    python -m dit_sparse.train.transformer --vae .work/ckpt/vae --out .work/ckpt/t2v --minutes 8 --compile

Videos are rendered and encoded by the frozen VAE on the fly into a replay buffer; each step mixes fresh
and buffered latents. Flow matching as in Wan: x_t = (1 - s) x_0 + s e, the model predicts e - x_0 at
timestep 1000 s, with s drawn uniformly and then shifted by ``--shift`` (the scheduler's flow_shift).
Captions are dropped (replaced by "") with probability ``--drop`` for classifier-free guidance.
``--object-weight W`` (default 4) weighs the loss on latent tokens covered by (or next to) an object by 1 + W:
objects fill ~4% of the tokens but carry everything the caption names. ``--compile`` compiles each transformer
block (0.082 s per step of batch 32 on an H100 instead of 0.145 s eager).
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from . import data
from .common import Clock, load_optimizer_tensors, log, lr_at, optimizer_tensors
from .model import (
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    build_vae,
    encode_prompts,
    load_checkpoint,
    prefixed,
    save_checkpoint,
    unprefixed,
)


def load_vae(path: str, device: torch.device):
    """The trained VAE from its checkpoint, with latent statistics written into its config, frozen."""
    tensors, meta = load_checkpoint(path)
    vae = build_vae()
    vae.load_state_dict(unprefixed(tensors, "model."))
    vae.register_to_config(latents_mean=meta["latents_mean"], latents_std=meta["latents_std"])
    vae.requires_grad_(False)
    return vae.to(device).eval(), meta


def latent_object_mask(coverage: torch.Tensor, t_factor: int = 4, s_factor: int = 8) -> torch.Tensor:
    """Object coverage (B, 1, T, H, W) -> bool mask on the Wan latent grid, dilated by one latent pixel.

    Latent frame 0 holds pixel frame 0 alone and latent frame k >= 1 holds frames t_factor*(k-1)+1 .. t_factor*k.
    """
    cov = torch.cat([coverage[:, :, :1].expand(-1, -1, t_factor - 1, -1, -1), coverage], 2)
    grid = F.max_pool3d(cov, (t_factor, s_factor, s_factor))
    return F.max_pool3d(grid, (1, 3, 3), 1, (0, 1, 1)) > 0


class LatentBuffer:
    """Ring buffer of normalised video latents, their object masks and captions, filled from the generator."""

    def __init__(self, vae, size: int, frames: int, res: int, device: torch.device, seed: int) -> None:
        self.vae, self.size, self.frames, self.res, self.dev = vae, size, frames, res, device
        self.mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
        self.lat: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.caps: list[str] = []
        self.pos = 0
        self.filled = 0
        self.seed = seed

    @torch.no_grad()
    def add(self, n: int, two_prob: float) -> None:
        """Render, encode and store ``n`` new videos."""
        scenes = data.sample_scenes(self.seed, n, two_prob)
        video, coverage = data.render_with_coverage(scenes, self.frames, self.res, self.res, self.dev)
        self.seed += 1
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
            z = self.vae.encode(video).latent_dist.mode()
        z = ((z.float() - self.mean) / self.std).half()
        mask = latent_object_mask(coverage)
        if self.lat is None or self.mask is None:
            self.lat = torch.empty((self.size, *z.shape[1:]), dtype=torch.float16, device=self.dev)
            self.mask = torch.empty((self.size, *mask.shape[1:]), dtype=torch.bool, device=self.dev)
            self.caps = [""] * self.size
        for i in range(n):
            self.lat[self.pos] = z[i]
            self.mask[self.pos] = mask[i]
            self.caps[self.pos] = scenes[i].caption
            self.pos = (self.pos + 1) % self.size
        self.filled = min(self.filled + n, self.size)

    def sample(self, n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``n`` random buffered latents (float32), their object masks (B, 1, T, h, w) and captions."""
        assert self.lat is not None and self.mask is not None
        idx = [rng.randrange(self.filled) for _ in range(n)]
        at = torch.tensor(idx, device=self.dev)
        return self.lat[at].float(), self.mask[at], [self.caps[i] for i in idx]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", default=".work/ckpt/vae")
    ap.add_argument("--out", default=".work/ckpt/t2v")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fresh", type=int, default=32, help="new videos rendered and encoded per refresh")
    ap.add_argument(
        "--fresh-every", type=int, default=16, help="steps between refreshes (VAE encoding is launch-bound)"
    )
    ap.add_argument("--prime", type=int, default=1024, help="latents encoded before the first step")
    ap.add_argument("--buffer", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=61)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--drop", type=float, default=0.1, help="caption dropout probability")
    ap.add_argument("--two-prob", type=float, default=0.3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--object-weight", type=float, default=4.0, help="extra loss weight on object tokens")
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    ap.add_argument("--init", default=None, help="start from these weights (fresh optimizer, EMA and step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    vae, _ = load_vae(args.vae, dev)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer)).to(dev)
    transformer = build_transformer().to(dev)
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    params = [p for m in modules.values() for p in m.parameters()]
    names = {id(p): f"{k}.{n}" for k, m in modules.items() for n, p in m.named_parameters()}
    ema = {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step = 0
    meta: dict = {}
    try:
        tensors, meta = load_checkpoint(args.out)
        for k, m in modules.items():
            m.load_state_dict(unprefixed(tensors, f"model.{k}."))
        for n in ema:
            ema[n] = tensors[f"ema.{n}"].to(dev, torch.float32)
        step = int(meta["step"])
        n_opt = load_optimizer_tensors(opt, names, tensors, step)
        log(f"resumed from {args.out} at step {step} ({n_opt} optimizer states)")
    except FileNotFoundError:
        log("starting from scratch")
        if args.init:
            init, _ = load_checkpoint(args.init)
            src = "ema." if any(k.startswith("ema.") for k in init) else "model."
            for k, m in modules.items():
                m.load_state_dict({n: v.float() for n, v in unprefixed(init, f"{src}{k}.").items()}, strict=False)
            ema = {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}
            log(f"initialised weights from {args.init} ({src})")
    log(
        f"transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, on {dev}"
    )

    def save() -> None:
        meta.update(step=step, kind="t2v", shift=args.shift, drop=args.drop)
        tensors = {}
        for k, m in modules.items():
            tensors.update(prefixed(m.state_dict(), f"model.{k}."))
        tensors.update({f"ema.{n}": v for n, v in ema.items()})
        tensors.update(optimizer_tensors(opt, names))
        save_checkpoint(args.out, tensors, meta)

    buf = LatentBuffer(vae, args.buffer, args.frames, args.size, dev, seed=1_000_003 * (1 + step // 1000) + step)
    while buf.filled < min(args.buffer, max(args.prime, args.batch)):
        buf.add(64, args.two_prob)
    log(f"buffer primed with {buf.filled} latents {tuple(buf.lat.shape[1:])}")  # type: ignore[union-attr]

    if args.compile:
        transformer.compile_repeated_blocks(fullgraph=True)
    ema_params = [dict(m.named_parameters())[n.split(".", 1)[1]] for n in ema for m in [modules[n.split(".", 1)[0]]]]
    clock = Clock(args.minutes)
    last_save = clock.elapsed
    rng = random.Random(step + 12345)
    gen = torch.Generator(device=dev).manual_seed(step + 777)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    transformer.train()
    text_encoder.train()
    loss_avg = None
    while not clock.done():
        if args.fresh and step % args.fresh_every == 0:
            buf.add(args.fresh, args.two_prob)
        x0, mask, caps = buf.sample(args.batch, rng)
        caps = ["" if rng.random() < args.drop else c for c in caps]
        b = x0.shape[0]
        u = torch.rand(b, device=dev, generator=gen)
        s = args.shift * u / (1 + (args.shift - 1) * u)
        noise = torch.randn(x0.shape, device=dev, generator=gen)
        sv = s.view(b, 1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * noise
        target = noise - x0
        for g in opt.param_groups:
            g["lr"] = lr_at(args.lr, step, clock.frac, warmup=args.warmup)
        with torch.autocast(**amp):
            emb = encode_prompts(tokenizer, text_encoder, caps, dev)
            pred = transformer(xt, s * 1000.0, emb, return_dict=False)[0]
        weight = 1 + args.object_weight * mask.float()
        loss = (weight * (pred.float() - target) ** 2).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.values()), [p.detach() for p in ema_params], 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 100 == 0 or step == 1:
            log(
                f"step {step} t={clock.elapsed:.0f}s loss {loss.item():.4f} avg {loss_avg:.4f} lr {opt.param_groups[0]['lr']:.2e}"
            )
        if clock.elapsed - last_save > args.save_every:
            save()
            last_save = clock.elapsed
    meta["loss_avg"] = loss_avg
    save()
    log(f"done: step {step}, loss avg {loss_avg}")


if __name__ == "__main__":
    main()
