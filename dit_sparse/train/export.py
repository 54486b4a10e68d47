"""Export trained checkpoints as a Diffusers WanPipeline folder.

    python -m dit_sparse.train.export --vae .work/ckpt/vae --t2v .work/ckpt/t2v --out assets/tiny-t2v

Uses the EMA weights of the transformer and text encoder (``--raw`` for the raw ones). Weights are saved
as float32 safetensors; the model card (README.md) is written by ``dit_sparse.train.evaluate --card``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .model import (
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    load_checkpoint,
    unprefixed,
)
from .transformer import load_vae


def build_scheduler(shift: float = 3.0):
    """UniPC with flow sigmas, as the Wan 2.1 checkpoints ship it."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
    )


def build_pipeline(vae_ckpt: str, t2v_ckpt: str, use_ema: bool = True, device: str = "cpu"):
    """A WanPipeline holding the trained weights."""
    from diffusers import WanPipeline

    vae, _ = load_vae(vae_ckpt, torch.device(device))
    tensors, meta = load_checkpoint(t2v_ckpt)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer))
    transformer = build_transformer()
    src = "ema." if use_ema else "model."
    for name, module in (("text_encoder", text_encoder), ("transformer", transformer)):
        state = {k: v.float() for k, v in unprefixed(tensors, f"{src}{name}.").items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        # EMA holds each parameter once: tied copies (UMT5's embed_tokens = shared) come with their twin
        tied = {"encoder.embed_tokens.weight"}
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"{name}: missing {missing}, unexpected {unexpected}")
    vae.requires_grad_(True)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.float().eval(),
        scheduler=build_scheduler(float(meta.get("shift", 3.0))),
        transformer=transformer.eval(),
    )
    return pipe.to(device), meta


def export(vae_ckpt: str, t2v_ckpt: str, out: str, use_ema: bool = True) -> Path:
    """Write the pipeline folder ``out`` (replacing its model files, keeping README.md and images)."""
    pipe, _ = build_pipeline(vae_ckpt, t2v_ckpt, use_ema)
    dst = Path(out)
    for sub in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler"):
        shutil.rmtree(dst / sub, ignore_errors=True)
    pipe.save_pretrained(str(dst), safe_serialization=True)
    # name the tokenizer class that both transformers 4.x and 5.x know (5.x writes its new "TokenizersBackend")
    for f, key in ((dst / "model_index.json", "tokenizer"), (dst / "tokenizer" / "tokenizer_config.json", None)):
        cfg = json.loads(f.read_text())
        if key:
            cfg[key] = ["transformers", "PreTrainedTokenizerFast"]
        else:
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", default=".work/ckpt/vae")
    ap.add_argument("--t2v", default=".work/ckpt/t2v")
    ap.add_argument("--out", default="assets/tiny-t2v")
    ap.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    args = ap.parse_args(argv)
    dst = export(args.vae, args.t2v, args.out, use_ema=not args.raw)
    total = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(f"exported to {dst} ({total / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
