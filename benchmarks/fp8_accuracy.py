"""FP8 attention accuracy: relative L2 error and cosine of ``precision="fp8"`` against fp32 attention.

    python benchmarks/fp8_accuracy.py                  # GPU: the embedded model at its defaults, synthetic outliers
    python benchmarks/fp8_accuracy.py --smoke          # CPU, tiny shapes (the emulation only)

(a) q/k/v captured from every self-attention call of the embedded tiny model (``assets/tiny-t2v``) during one
generation (the ``dense`` method routes each call through the kernel entry point, where it is recorded);
(b) synthetic inputs, q/k/v ~ N(0, 1), K with large per-channel offsets on 1/8 of its channels (amplitude 0 .. 100),
V with and without a per-channel mean. Each input is measured with the torch emulation (``backend="reference"``), the
emulation without K smoothing (what smoothing buys), and, on a Hopper or newer GPU, the fp8 Triton kernel itself;
all against fp32 attention on the same (full) plan. Writes ``fp8-accuracy-<date><tag>.{json,md}`` (refuses to
overwrite them without ``--force``), stamped with :func:`dit_sparse.files.environment`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

from dit_sparse import defaults
from dit_sparse.files import atomic_write_json, atomic_write_text, environment
from dit_sparse.kernels import AttentionCall, block_sparse_attention
from dit_sparse.kernels.quant import emulate_fp8_attention
from dit_sparse.plan import BlockPlan

BLOCK = 128


def metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 error and cosine similarity of ``out`` against ``ref`` (flattened, float32)."""
    a, b = out.float().flatten(), ref.float().flatten()
    return {"rel_l2": float((a - b).norm() / b.norm()), "cosine": float(torch.nn.functional.cosine_similarity(a, b, 0))}


def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: bool) -> dict[str, dict[str, float]]:
    """fp8 emulation (with and without K smoothing) and, when ``kernel``, the fp8 Triton kernel, against fp32."""
    n, d = q.shape[-2:]
    plan = BlockPlan.full(n, BLOCK, device=q.device)
    ref = block_sparse_attention(q.float(), k.float(), v.float(), plan, backend="reference")
    call = AttentionCall(q, k, v, plan, d**-0.5, False, None, "fp8")
    res = {
        "emulation": metrics(emulate_fp8_attention(call)[0], ref),
        "emulation_no_smoothing": metrics(emulate_fp8_attention(call, smooth_k=False)[0], ref),
        "bf16": metrics(block_sparse_attention(q, k, v, plan, backend="reference" if not kernel else "triton"), ref),
    }
    if kernel:
        res["kernel"] = metrics(block_sparse_attention(q, k, v, plan, backend="triton", precision="fp8"), ref)
    return res


@torch.no_grad()
def capture_model(model: str, steps: int, frames: int, height: int, width: int, device: str) -> list[tuple]:
    """(q, k, v) of every self-attention call of one generation of the embedded model (bf16 on CUDA)."""
    import dit_sparse
    import dit_sparse.processor as processor
    from dit_sparse.train.evaluate import load_pipeline

    pipe = load_pipeline(model, device)
    captured: list[tuple] = []
    real = processor.block_sparse_attention

    def record(q, k, v, *args, **kwargs):
        captured.append(tuple(t.detach().clone() for t in (q, k, v)))
        return real(q, k, v, *args, **kwargs)

    dit_sparse.apply(pipe, "dense", backend="reference", min_seq_len=0)
    try:
        with mock.patch.object(processor, "block_sparse_attention", record):
            pipe(prompt=defaults.PROMPT, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                 guidance_scale=1.0, generator=torch.Generator(device).manual_seed(0), output_type="latent")  # fmt: skip
    finally:
        dit_sparse.remove(pipe)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [tuple(t.to(dtype) for t in qkv) for qkv in captured]


def synthetic(h: int, n: int, d: int, amp: float, v_mean: bool, device: str, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    outliers = torch.rand(d, generator=g) < 0.125
    k = k + amp * torch.randn(h, 1, d, generator=g) * outliers
    if v_mean:
        v = v + torch.randn(h, 1, d, generator=g)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return tuple(t.to(device, dtype) for t in (q, k, v))


def summarize(rows: list[dict], variant: str) -> dict[str, float]:
    errs = [r[variant]["rel_l2"] for r in rows if variant in r]
    cos = [r[variant]["cosine"] for r in rows if variant in r]
    if not errs:
        return {}
    return {"mean_rel_l2": statistics.mean(errs), "max_rel_l2": max(errs), "min_cosine": min(cos)}


def write_markdown(res: dict, path: Path) -> None:
    variants = ("kernel", "emulation", "emulation_no_smoothing", "bf16")
    lines = [
        f"# FP8 attention accuracy {res['date']}",
        "",
        f"- device: {res['device']}; torch {res['torch']}; triton {res['triton']}; command: `{res['command']}`",
        "- rel. L2 error and cosine of the attention output against fp32 attention (full plan, block 128); "
        "`bf16` is today's kernel on the same inputs.",
        "",
        "## (a) embedded model activations",
        "",
        f"{res['model']['calls']} self-attention calls, shape {res['model']['shape']}",
        "",
        "| variant | mean rel. L2 | max rel. L2 | min cosine |",
        "| --- | --- | --- | --- |",
    ]
    for v in variants:
        s = res["model"]["summary"].get(v)
        if s:
            lines.append(f"| {v} | {s['mean_rel_l2']:.4f} | {s['max_rel_l2']:.4f} | {s['min_cosine']:.6f} |")
    lines += ["", "## (b) synthetic, K with per-channel outliers", "",
              "| H×N×D | K outlier amplitude | V mean | " + " | ".join(f"{v} rel. L2" for v in variants) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in variants) + " |"]  # fmt: skip
    for r in res["synthetic"]:
        cells = " | ".join(f"{r[v]['rel_l2']:.4f}" if v in r else "-" for v in variants)
        lines.append(f"| {r['shape']} | {r['amp']:g} | {r['v_mean']} | {cells} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the emulation only")
    ap.add_argument("--model", default=str(defaults.MODEL_PATH))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--force", action="store_true", help="overwrite existing result files")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    kernel = cuda and torch.cuda.get_device_capability() >= (9, 0)
    out_dir = Path(args.out)
    stem = out_dir / f"fp8-accuracy-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}{args.tag}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if not args.force and any(p.exists() for p in paths):
        sys.exit(f"{paths[0]} exists: pass --force to overwrite it, or --tag to name another")
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.smoke:
        gen = dict(steps=2, frames=9, height=64, width=64)
        shapes = [(2, 512, 64)]
    else:
        gen = dict(steps=defaults.STEPS, frames=defaults.FRAMES, height=defaults.HEIGHT, width=defaults.WIDTH)
        shapes = [(12, 8192, 128), (24, 8192, 64)]
    captured = capture_model(args.model, device=device, **gen)
    model_rows = [measure(*qkv, kernel) for qkv in captured]
    res = dict(
        environment(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join(sys.argv),
        model=dict(
            path=args.model,
            **gen,
            calls=len(captured),
            shape=list(captured[0][0].shape),
            rows=model_rows,
            summary={v: summarize(model_rows, v) for v in ("kernel", "emulation", "emulation_no_smoothing", "bf16")},
        ),  # fmt: skip
        synthetic=[],
    )
    for i, (h, n, d) in enumerate(shapes):
        for amp in (0.0, 10.0, 30.0, 100.0):
            for v_mean in (False, True):
                row = measure(*synthetic(h, n, d, amp, v_mean, device, seed=i), kernel)
                res["synthetic"].append(dict(shape=f"{h}x{n}x{d}", amp=amp, v_mean=v_mean, **row))
    atomic_write_json(paths[0], res)
    write_markdown(res, paths[1])
    print(paths[1].read_text())


if __name__ == "__main__":
    main()
