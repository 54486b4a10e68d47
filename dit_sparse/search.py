"""Offline search of Sparse-vDiT configurations (Chen et al. 2025, §3.3 "Offline sparse diffusion search").

For every self-attention layer and head, over the denoising steps of a few prompts, the search measures each
candidate mode's attention-output error against dense attention (computed with the same kernel), and predicts its
cost from a cost model calibrated on kernel times measured on the current device. Per head it then keeps:

- ``selection="cost"`` (default): among the modes whose relative error (MSE divided by the layer's mean output
  power over heads) is within ``error_budget`` (default 0.05), the one with the lowest predicted time; dense when
  none is;
- ``selection="paper"``: the paper's Eq. 2, the mode minimising ``MSE + λ·(1 − S)`` (raw MSE of the head's output,
  ``S`` its sparsity, ``λ = 0.5``), dense when every loss exceeds ``ε = 1``.

The cost model is ``time per head ≈ a + b · density`` (least squares over random block plans at a few densities,
timed with the kernel the processor uses; ``b`` and ``a`` clamped at 0). On CPU it times the reference/flex
backend, whose cost hardly depends on density: the JSON says which backend and device it measured.

Feeding forward (``feed``): ``"dense"`` (default) returns the dense output, so every layer's errors are measured on
the dense trajectory; ``"chosen"`` returns, per head, the output of the mode that is best on the statistics so far
(the paper feeds the chosen sparse output forward). Layers finished in earlier passes always feed their final
modes forward.

Resumable: results go to the output JSON after every prompt (``"complete": false`` until the end); a rerun with the
same output file skips finished layers and, in the unfinished pass, the prompts already measured.
``layers_per_pass`` (default: all layers in one pass) searches the layers in groups, earlier groups fixed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Kernel, Method
from dit_sparse.methods.svdit import (
    CONFIG_FORMAT,
    MODES,
    SPARSE_MODES,
    SvditConfig,
    build_group_plan,
    group_heads,
    save_config,
)
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext

CALIBRATION_DENSITIES = (0.1, 0.25, 0.5, 1.0)


@dataclass
class SearchSettings:
    """How the search chooses (defaults: paper λ and ε, our error budget and cost model).

    Attributes:
        lam: λ of Eq. 2 (default 0.5).
        eps: ε of Eq. 2: dense when every loss exceeds it (default 1.0).
        error_budget: largest relative MSE a mode may have under ``selection="cost"`` (default 0.05).
        selection: ``"cost"`` (cheapest within the budget) or ``"paper"`` (Eq. 2).
        feed: ``"dense"`` or ``"chosen"`` output handed to the next layer during the search.
        candidates: modes tried besides dense (default all four sparse modes).
        calibration_repeats: timed repeats per density (median; default 3).
    """

    lam: float = 0.5
    eps: float = 1.0
    error_budget: float = 0.05
    selection: str = "cost"
    feed: str = "dense"
    candidates: tuple[str, ...] = SPARSE_MODES
    calibration_repeats: int = 3

    def __post_init__(self) -> None:
        if self.selection not in ("cost", "paper"):
            raise ValueError(f"selection must be 'cost' or 'paper', got {self.selection!r}")
        if self.feed not in ("dense", "chosen"):
            raise ValueError(f"feed must be 'dense' or 'chosen', got {self.feed!r}")
        bad = [m for m in self.candidates if m not in SPARSE_MODES]
        if bad:
            raise ValueError(f"candidates must be among {', '.join(SPARSE_MODES)}, got {bad}")
        self.candidates = tuple(self.candidates)


# ---------------------------------------------------------------------------------------------- cost model
def _time_call(fn: Any, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` (one warm-up call; CUDA synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def calibrate_cost(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: Kernel,
    block: int,
    densities: Sequence[float] = CALIBRATION_DENSITIES,
    repeats: int = 3,
    backend: str = "auto",
) -> dict[str, Any]:
    """Fit ``time per head = a + b · density`` from kernel times on random block plans of the call's shape."""
    from dit_sparse.kernels.api import resolve_backend

    n, heads = q.shape[-2], q.shape[1]
    m = -(-n // block)
    gen = torch.Generator(device="cpu").manual_seed(0)
    measured = []
    for dens in densities:
        mask = torch.rand(heads, m, m, generator=gen) < dens
        mask |= torch.eye(m, dtype=torch.bool)  # every query block needs a key block
        plan = BlockPlan.from_block_mask(mask.to(q.device), n, block)
        actual = plan.density()
        seconds = _time_call(lambda plan=plan: kernel(q, k, v, plan, False), q.device, repeats)
        measured.append((actual, seconds / heads))
    xs = torch.tensor([d for d, _ in measured], dtype=torch.float64)
    ys = torch.tensor([t for _, t in measured], dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], 1)
    a, b = torch.linalg.lstsq(design, ys[:, None]).solution.flatten().tolist()
    b = max(b, 0.0)
    a = max(a, 0.0)
    name = resolve_backend(backend, q.device)
    return {
        "model": "time_per_head_s = a + b * density",
        "a_s": a,
        "b_s": b,
        "densities": [d for d, _ in measured],
        "times_per_head_s": [t for _, t in measured],
        "device": torch.cuda.get_device_name(q.device)
        if q.device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "backend": name,
        "shape": {"batch": q.shape[0], "heads": heads, "seq_len": n, "head_dim": q.shape[-1], "dtype": str(q.dtype)},
        "torch": torch.__version__,
        "note": (
            "measured on the GPU kernel the search ran with"
            if q.device.type == "cuda"
            else f"measured on CPU with the {name!r} backend, which computes (nearly) every score: its time hardly "
            "depends on density, so this cost model ranks modes mostly by their error; recalibrate on the GPU"
        ),
    }


def predicted_cost(cost: dict[str, Any] | None, mode: str, density: float) -> float:
    """Predicted seconds per head of one call in ``mode`` (skip: 0; without a cost model: the density)."""
    if mode == "skip":
        return 0.0
    if cost is None:
        return density
    return cost["a_s"] + cost["b_s"] * density


# ---------------------------------------------------------------------------------------------- decisions
def choose_modes(layer_stats: dict[str, Any], settings: SearchSettings, cost: dict[str, Any] | None) -> list[str]:
    """Per head, the mode the statistics of one layer select (see the module docstring)."""
    count = max(1, layer_stats["count"])
    power = [p / count for p in layer_stats["power"]]
    layer_power = max(sum(power) / max(1, len(power)), 1e-30)
    chosen = []
    for h in range(len(power)):
        best, best_key = "dense", None
        if settings.selection == "paper":
            for mode in settings.candidates:
                mse = layer_stats["mse"][mode][h] / count
                loss = mse + settings.lam * (1.0 - _sparsity(layer_stats, mode))
                if loss <= settings.eps and (best_key is None or loss < best_key):
                    best, best_key = mode, loss
        else:
            for mode in settings.candidates:
                rel = layer_stats["mse"][mode][h] / count / layer_power
                if rel > settings.error_budget:
                    continue
                density = layer_stats["density"][mode]
                key = (predicted_cost(cost, mode, density), density, rel)  # density breaks cost ties (flat CPU models)
                if best_key is None or key < best_key:
                    best, best_key = mode, key
        chosen.append(best)
    return chosen


def _sparsity(layer_stats: dict[str, Any], mode: str) -> float:
    return 1.0 - layer_stats["density"][mode]


def head_errors(layer_stats: dict[str, Any], modes: list[str]) -> dict[str, list[float]]:
    """Measured mean MSE and relative MSE of each head in its chosen mode (dense: 0)."""
    count = max(1, layer_stats["count"])
    power = [p / count for p in layer_stats["power"]]
    layer_power = max(sum(power) / max(1, len(power)), 1e-30)
    mse = [0.0 if m == "dense" else layer_stats["mse"][m][h] / count for h, m in enumerate(modes)]
    return {"mse": mse, "rel_mse": [e / layer_power for e in mse]}


# ---------------------------------------------------------------------------------------------- search method
class SvditSearch(Method):
    """Search-mode method: dense output plus every candidate's output per head, errors accumulated per layer.

    Not registered by name: :func:`search` installs it on the processors that ``dit_sparse.apply`` creates.
    """

    name = "svdit_search"
    config_cls = SvditConfig
    dynamic = True

    def __init__(
        self,
        config: SvditConfig | None = None,
        settings: SearchSettings | None = None,
        state: dict[str, Any] | None = None,
        active_layers: set[int] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(config)
        self.settings = settings or SearchSettings()
        self.state = state if state is not None else new_state()
        self.active_layers = active_layers
        self.backend = backend
        self.geometry = {
            "diag_window": self.config.diag_window,
            "multi_window": self.config.multi_window,
            "stripe_frames": self.config.stripe_frames,
        }
        self._plans: dict[tuple, BlockPlan] = {}
        self.measuring = True
        self.layout: TokenLayout | None = None
        self.heads: int | None = None

    def _plan(self, mode: str, layout: TokenLayout, heads: int, device: torch.device) -> BlockPlan:
        key = (mode, layout, heads, device)
        if key not in self._plans:
            self._plans[key] = build_group_plan(
                [mode] * heads, layout, self.config.block_size, device=device, **self.geometry
            ).check()
        return self._plans[key]

    def _fixed_output(self, q, k, v, layout, modes, kernel) -> torch.Tensor:
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        for idx, group in group_heads(modes):
            plan_key = ("group", tuple(group), layout, q.device)
            if plan_key not in self._plans:
                self._plans[plan_key] = build_group_plan(
                    group, layout, self.config.block_size, device=q.device, **self.geometry
                ).check()
            idx_t = torch.tensor(idx, device=q.device)
            o, _ = kernel(q.index_select(1, idx_t), k.index_select(1, idx_t), v.index_select(1, idx_t),
                          self._plans[plan_key], False)  # fmt: skip
            out.index_copy_(1, idx_t, o)
        return out

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, ctx: StepContext, kernel: Kernel
    ) -> torch.Tensor:
        """Dense output (or the chosen one, ``feed="chosen"``); accumulates each candidate's per-head error."""
        layer, heads = ctx.layer_index, q.shape[1]
        self.layout = self.layout or layout
        self.heads = self.heads or heads
        finished = self.state["finished"].get(str(layer))
        if finished is not None:
            return self._fixed_output(q, k, v, layout, finished, kernel)
        full = self._plan("dense", layout, heads, q.device)
        dense, _ = kernel(q, k, v, full, False)
        if not self.measuring or (self.active_layers is not None and layer not in self.active_layers):
            return dense
        if self.state.get("cost") is None:
            self.state["cost"] = calibrate_cost(
                q, k, v, kernel, self.config.block_size, repeats=self.settings.calibration_repeats,
                backend=self.backend,
            )  # fmt: skip
        d32 = dense.float()
        stats = self.state["stats"].setdefault(str(layer), new_layer_stats(heads, self.settings.candidates))
        power = d32.square().mean(dim=(0, 2, 3))
        outputs: dict[str, torch.Tensor] = {}
        for mode in self.settings.candidates:
            if mode == "skip":
                err = power
                stats["density"][mode] = 0.0
            else:
                plan = self._plan(mode, layout, heads, q.device)
                o, _ = kernel(q, k, v, plan, False)
                outputs[mode] = o
                err = (o.float() - d32).square().mean(dim=(0, 2, 3))
                stats["density"][mode] = plan.density()
            stats["mse"][mode] = [a + b for a, b in zip(stats["mse"][mode], err.tolist(), strict=True)]
        stats["power"] = [a + b for a, b in zip(stats["power"], power.tolist(), strict=True)]
        stats["count"] += 1
        if self.settings.feed == "dense":
            return dense
        modes = choose_modes(stats, self.settings, self.state.get("cost"))
        out = dense.clone()
        for h, mode in enumerate(modes):
            if mode == "skip":
                out[:, h] = 0
            elif mode != "dense":
                out[:, h] = outputs[mode][:, h]
        return out


def new_state() -> dict[str, Any]:
    return {"stats": {}, "finished": {}, "done_prompts": [], "cost": None}


def new_layer_stats(heads: int, candidates: Sequence[str]) -> dict[str, Any]:
    return {
        "count": 0,
        "power": [0.0] * heads,
        "mse": {m: [0.0] * heads for m in candidates},
        "density": {m: 0.0 for m in candidates},
    }


# ---------------------------------------------------------------------------------------------- the driver
def _self_attention_processors(pipe: Any) -> tuple[list[Any], int]:
    """The SparseProcessors installed on the pipeline's transformer(s) and the number of self-attention layers."""
    from dit_sparse.pipelines import adapter_for, pipeline_transformers

    procs, layers = [], 0
    for _, model in pipeline_transformers(pipe):
        modules = adapter_for(model).self_attention_modules(model)
        layers = max(layers, len(modules))
        procs.extend(module.processor for _, module in modules)
    return procs, layers


def _prompt_key(i: int, prompt: Any) -> str:
    return f"{i}:{prompt}" if isinstance(prompt, str) else f"{i}:<kwargs>"


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def search(
    pipe: Any,
    prompts: Sequence[str | dict[str, Any]],
    out: str | Path,
    *,
    steps: int = 10,
    settings: SearchSettings | None = None,
    layers_per_pass: int | None = None,
    seed: int = 0,
    backend: str = "auto",
    block_size: int = 128,
    diag_window: float = 1.0,
    multi_window: float = 1.0,
    stripe_frames: int = 1,
    progress: bool = True,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Search a Sparse-vDiT configuration for ``pipe`` and write it to ``out`` (JSON); returns it.

    Args:
        pipe: a Diffusers video pipeline (or anything ``dit_sparse.apply`` takes that is callable).
        prompts: prompt strings, or dicts of call keyword arguments (e.g. ``prompt_embeds``) per generation.
        out: output JSON; an unfinished one from an earlier run is resumed.
        steps: ``num_inference_steps`` of each generation (default 10); every step is measured.
        settings: :class:`SearchSettings` (selection rule, budget, feed-forward).
        layers_per_pass: search this many layers per pass over the prompts (default all at once).
        seed: generator seed of each generation.
        backend: kernel backend of the candidates and of the cost model (``auto``: triton on CUDA).
        block_size, diag_window, multi_window, stripe_frames: the mode geometry (see ``SvditConfig``).
        **call_kwargs: more pipeline call arguments (``height``, ``width``, ``num_frames``, ``guidance_scale``...).
    """
    from tqdm.auto import tqdm

    import dit_sparse

    settings = settings or SearchSettings()
    out = Path(out)
    geometry = {"diag_window": diag_window, "multi_window": multi_window, "stripe_frames": stripe_frames,
                "block_size": block_size}  # fmt: skip
    state = new_state()
    if out.exists():
        try:
            previous = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot resume from {str(out)!r}: {exc}; delete it to start over") from exc
        if previous.get("params", geometry) != geometry:
            raise ValueError(
                f"{str(out)!r} was searched with {previous.get('params')}, this run asks for {geometry}: "
                "use another output file"
            )
        state = previous.get("search", {}).get("state", state)
        if previous.get("complete"):
            return previous
    config = SvditConfig(block_size=block_size, diag_window=diag_window, multi_window=multi_window,
                         stripe_frames=stripe_frames, min_seq_len=0)  # fmt: skip
    dit_sparse.apply(pipe, "dense", backend=backend, min_seq_len=0)
    try:
        procs, num_layers = _self_attention_processors(pipe)
        method = SvditSearch(config, settings, state, backend=backend)
        for proc in {id(p): p for p in procs}.values():
            proc.method = method
        todo = [i for i in range(num_layers) if str(i) not in state["finished"]]
        per_pass = layers_per_pass or max(1, len(todo))
        groups = [todo[i : i + per_pass] for i in range(0, len(todo), per_pass)]
        bar = tqdm(total=len(groups) * len(prompts), desc="svdit search", disable=not progress)
        for group in groups:
            method.active_layers = set(group)
            for i, prompt in enumerate(prompts):
                key = _prompt_key(i, prompt)
                if key not in state["done_prompts"]:
                    kwargs = dict(call_kwargs)
                    kwargs.update(prompt if isinstance(prompt, dict) else {"prompt": prompt})
                    kwargs.setdefault("num_inference_steps", steps)
                    kwargs.setdefault("generator", torch.Generator(device="cpu").manual_seed(seed))
                    kwargs.setdefault("output_type", "latent")
                    bar.set_postfix(layers=f"{group[0]}-{group[-1]}", prompt=i)
                    pipe(**kwargs)
                    state["done_prompts"].append(key)
                    _write(out, _document(state, settings, method, num_layers, geometry, pipe, complete=False))
                bar.update(1)
            for layer in group:
                stats = state["stats"].get(str(layer))
                if stats is None:
                    raise RuntimeError(
                        f"the search saw no sparse self-attention call for layer {layer}: are the sequences shorter "
                        "than the method's min_seq_len, or did the pipeline not call the transformer?"
                    )
                state["finished"][str(layer)] = choose_modes(stats, settings, state.get("cost"))
            state["done_prompts"] = []
            _write(out, _document(state, settings, method, num_layers, geometry, pipe, complete=False))
        bar.close()
    finally:
        dit_sparse.remove(pipe)
    data = _document(state, settings, method, num_layers, geometry, pipe, complete=True)
    save_config(data, out)
    return data


def _document(
    state: dict[str, Any],
    settings: SearchSettings,
    method: SvditSearch,
    num_layers: int,
    geometry: dict[str, Any],
    pipe: Any,
    complete: bool,
) -> dict[str, Any]:
    layout = method.layout
    transformer = getattr(pipe, "transformer", pipe)
    layers = {k: state["finished"][k] for k in sorted(state["finished"], key=int)}
    errors = {k: head_errors(state["stats"][k], v) for k, v in layers.items() if k in state["stats"]}
    densities = {}
    if layout is not None:
        from dit_sparse.methods.svdit import modes_density

        geo = {k: v for k, v in geometry.items() if k != "block_size"}
        densities = {k: modes_density(v, layout, geometry["block_size"], **geo) for k, v in layers.items()}
    return {
        "format": CONFIG_FORMAT,
        "version": 1,
        "complete": complete,
        "model": {"class": type(transformer).__name__, "pipeline": type(pipe).__name__},
        "heads": method.heads,
        "num_layers": num_layers,
        "layout": None
        if layout is None
        else {
            "frames": layout.frames,
            "height": layout.height,
            "width": layout.width,
            "text_len": layout.text_len,
            "text_where": layout.text_where,
        },  # fmt: skip
        "params": geometry,
        "layers": layers,
        "density": densities,
        "errors": errors,
        "cost_model": state.get("cost"),
        "search": {
            "selection": settings.selection,
            "lambda": settings.lam,
            "epsilon": settings.eps,
            "error_budget": settings.error_budget,
            "feed": settings.feed,
            "candidates": list(settings.candidates),
            "modes": list(MODES),
            "state": state,
        },
    }


# ---------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dit-sparse search`` on an ``argparse`` subparsers object; returns the sub-parser."""
    p = subparsers.add_parser(
        "search",
        help="offline Sparse-vDiT search: write a per-(layer, head) mode configuration (JSON)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="local Diffusers pipeline folder (or hub id)")
    p.add_argument("--prompts", nargs="+", required=True, help="prompts, or @FILE with one prompt per line")
    p.add_argument("--out", required=True, help="output JSON (resumed when it exists unfinished)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per prompt (default 10)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="num_frames of the pipeline call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--backend", default="auto", help="kernel backend (auto, triton, flex, reference)")
    p.add_argument("--selection", choices=("cost", "paper"), default="cost")
    p.add_argument("--error-budget", type=float, default=0.05, help="max relative MSE (selection=cost)")
    p.add_argument("--feed", choices=("dense", "chosen"), default="dense")
    p.add_argument("--layers-per-pass", type=int, default=None)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of ``dit-sparse search``."""
    from diffusers import DiffusionPipeline

    prompts: list[str] = []
    for item in args.prompts:
        if item.startswith("@"):
            prompts.extend(line.strip() for line in Path(item[1:]).read_text().splitlines() if line.strip())
        else:
            prompts.append(item)
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).to(args.device)
    call = {k: v for k, v in (("height", args.height), ("width", args.width), ("num_frames", args.frames)) if v}
    settings = SearchSettings(error_budget=args.error_budget, selection=args.selection, feed=args.feed)
    data = search(
        pipe, prompts, args.out, steps=args.steps, settings=settings, layers_per_pass=args.layers_per_pass,
        seed=args.seed, backend=args.backend, block_size=args.block_size, progress=not args.no_progress, **call,
    )  # fmt: skip
    counts: dict[str, int] = {}
    for modes in data["layers"].values():
        for mode in modes:
            counts[mode] = counts.get(mode, 0) + 1
    dens = data.get("density", {})
    mean = sum(dens.values()) / len(dens) if dens else float("nan")
    print(f"wrote {args.out}: {len(data['layers'])} layers, modes {counts}, mean density {mean:.3f}")
    return 0
