"""Training checkpoints from an exported pipeline folder, so that training goes on from the shipped weights.

    python -m dit_sparse.train.restore --model assets/tiny-t2v --vae .work/ckpt/vae0 --t2v .work/ckpt/t2v0

The VAE checkpoint holds ``model.*`` and the latent statistics (``vae --init`` and ``transformer --vae`` take
it); the text-to-video checkpoint holds the exported (EMA) weights as ``ema.*`` (``transformer --init`` takes it).
"""

from __future__ import annotations

import argparse

import torch

from .model import prefixed, save_checkpoint


def restore(model: str, vae_out: str, t2v_out: str) -> None:
    """Write the two checkpoints from the pipeline folder ``model``."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae")
    stats = {k: list(vae.config[k]) for k in ("latents_mean", "latents_std")}
    save_checkpoint(
        vae_out, prefixed(vae.state_dict(), "model."), dict(step=0, kind="vae", restored_from=model, **stats)
    )
    tensors = prefixed(
        WanTransformer3DModel.from_pretrained(model, subfolder="transformer").state_dict(), "ema.transformer."
    )
    tensors.update(
        prefixed(UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder").state_dict(), "ema.text_encoder.")
    )
    save_checkpoint(t2v_out, tensors, dict(step=0, kind="t2v", restored_from=model))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported pipeline folder")
    ap.add_argument("--vae", required=True, help="VAE checkpoint folder to write")
    ap.add_argument("--t2v", required=True, help="text-to-video checkpoint folder to write")
    args = ap.parse_args(argv)
    restore(args.model, args.vae, args.t2v)
    print(f"wrote {args.vae} and {args.t2v}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
