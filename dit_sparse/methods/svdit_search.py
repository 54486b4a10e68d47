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

The search itself (prompts, passes, resuming, the JSON) is :func:`dit_sparse.search` (``dit_sparse.offline_search``).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Kernel, Method
from dit_sparse.methods.svdit import SPARSE_MODES, SvditConfig, build_group_plan, group_heads
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext
from dit_sparse.timing import median_ms

CALIBRATION_DENSITIES = (0.1, 0.25, 0.5, 1.0)
SELECTIONS = ("cost", "paper")  # cheapest mode within the error budget; the paper's Eq. 2
FEEDS = ("dense", "chosen")  # output handed to the next layer while searching


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
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.feed not in FEEDS:
            raise ValueError(f"feed must be one of {', '.join(FEEDS)}, got {self.feed!r}")
        bad = [m for m in self.candidates if m not in SPARSE_MODES]
        if bad:
            raise ValueError(f"candidates must be among {', '.join(SPARSE_MODES)}, got {bad}")
        self.candidates = tuple(self.candidates)


# ---------------------------------------------------------------------------------------------- cost model
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
        seconds = median_ms(lambda plan=plan: kernel(q, k, v, plan, False), q.device, repeats) / 1e3
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

    Not registered by name: :func:`dit_sparse.search` installs one per transformer of the pipeline (``transformer``:
    its component name) on the processors that ``dit_sparse.apply`` creates. ``state`` (shared by them) keeps the
    statistics and finished layers per component and layer index; ``active_layers`` holds the (component, index) keys
    measured in this pass (None: every layer).
    """

    name = "svdit_search"
    config_cls = SvditConfig
    dynamic = True

    def __init__(
        self,
        config: SvditConfig | None = None,
        settings: SearchSettings | None = None,
        state: dict[str, Any] | None = None,
        active_layers: set[tuple[str, int]] | None = None,
        backend: str = "auto",
        transformer: str = "transformer",
    ) -> None:
        super().__init__(config)
        self.settings = settings or SearchSettings()
        self.state = state if state is not None else new_state()
        self.active_layers = active_layers
        self.backend = backend
        self.transformer = transformer
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
        finished = self.state["finished"].get(self.transformer, {}).get(str(layer))
        if finished is not None:
            return self._fixed_output(q, k, v, layout, finished, kernel)
        full = self._plan("dense", layout, heads, q.device)
        dense, _ = kernel(q, k, v, full, False)
        active = self.active_layers is None or (self.transformer, layer) in self.active_layers
        if not self.measuring or not active:
            return dense
        if self.state.get("cost") is None:
            self.state["cost"] = calibrate_cost(
                q, k, v, kernel, self.config.block_size, repeats=self.settings.calibration_repeats,
                backend=self.backend,
            )  # fmt: skip
        d32 = dense.float()
        layers = self.state["stats"].setdefault(self.transformer, {})
        stats = layers.setdefault(str(layer), new_layer_stats(heads, self.settings.candidates))
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
    """An empty search state: ``stats`` and ``finished`` are {component: {layer index: ...}}."""
    return {"stats": {}, "finished": {}, "done_prompts": [], "cost": None}


def new_layer_stats(heads: int, candidates: Sequence[str]) -> dict[str, Any]:
    """Zeroed per-head error sums of one layer."""
    return {
        "count": 0,
        "power": [0.0] * heads,
        "mse": {m: [0.0] * heads for m in candidates},
        "density": {m: 0.0 for m in candidates},
    }
