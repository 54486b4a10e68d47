"""Train the tiny 3D model on procedural shapes with rectified flow (CPU is enough: about 12 minutes).

    python -m dit_sparse.model3d.train --out assets/tiny-3d --minutes 12

Flow matching as in the video model (:mod:`dit_sparse.train.transformer`): ``x_s = (1 - s) x0 + s e``, the model
predicts ``e - x0``, ``s`` uniform; prompts are dropped (all padding) with probability ``--drop`` for
classifier-free guidance. Fresh shapes every step (nothing to buffer: the SDF is computed in closed form); an EMA of
the weights is what is saved. Reuses the video trainer's clock, learning-rate schedule and logging.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from dit_sparse.train.common import Clock, log, lr_at

from . import shapes
from .model import TinyDiT3D, load, save


def _resume(folder: str) -> tuple[TinyDiT3D, dict]:
    """The saved model (trainable) and its training record (steps and minutes so far)."""
    model = load(folder).train()
    return model, model.meta["training"]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/tiny-3d")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--drop", type=float, default=0.1, help="prompt dropout probability")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="start from this saved model (fresh optimizer; steps add up)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, done = (TinyDiT3D(), {"steps": 0, "minutes": 0.0}) if args.init is None else _resume(args.init)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    log(f"TinyDiT3D {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    clock, rng, step, loss_avg = Clock(args.minutes), random.Random(args.seed + done["steps"]), 0, None
    gen = torch.Generator().manual_seed(args.seed + done["steps"])
    while not clock.done():
        batch = shapes.sample(args.seed * 1_000_003 + done["steps"] + step, args.batch)
        x0 = shapes.sdf(batch)
        prompts = ["" if rng.random() < args.drop else s.caption for s in batch]
        s = torch.rand(args.batch, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        loss = ((model(xs, s, model.encode_prompts(prompts)) - (noise - x0)) ** 2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(args.lr, step, clock.frac, warmup=50, decay_from=0.6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 50 == 0 or step == 1:
            log(f"step {step} t={clock.elapsed:.0f}s loss {loss.item():.4f} avg {loss_avg:.4f}")
    model.load_state_dict(ema)
    meta = {
        "training": {
            "steps": done["steps"] + step,
            "batch": args.batch,
            "minutes": round(done["minutes"] + clock.elapsed / 60, 1),
            "loss_avg": round(loss_avg or 0.0, 4),
            "lr": args.lr,
            "prompt_dropout": args.drop,
            "ema": args.ema,
            "seed": args.seed,
            "date": time.strftime("%Y-%m-%d"),
            "device": "cpu",
        }
    }
    save(model, args.out, meta)
    log(f"done: step {step}, loss avg {loss_avg}, saved to {args.out}")


if __name__ == "__main__":
    main()
