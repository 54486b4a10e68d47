"""``svdit``: Sparse-vDiT (Chen et al. 2025, "Unleashing the Power of Sparse Attention to Accelerate Video DiTs").

Each (layer, head) runs one of five modes (paper §3.2–3.3), chosen offline by :func:`dit_sparse.search`:

- ``dense``: full attention;
- ``diagonal``: a band around the main diagonal in the original (frame-major) token order: keys within
  ``diag_window · P`` tokens of the query (``P`` = tokens per frame), i.e. the frame-local spatial neighbourhood;
- ``multi_diagonal``: tokens permuted so the same spatial position across frames is contiguous (spatial-major
  order ``s · T + t``), then a band of ``multi_window · P`` tokens: the same spatial neighbourhood in every frame,
  i.e. diagonals at offsets that are multiples of ``P`` in the original order;
- ``vertical_stripe``: global key columns: every token of the first ``stripe_frames`` frames (and the text);
- ``skip``: the head is not computed; its output is zero (the paper's rule, ``HEAD_SKIP``).
Text rows and columns are always attended fully.

Head fusion (paper §3.4): all heads of a layer in the original token order (dense, diagonal, vertical-stripe,
skip) share one plan with per-head block lists, hence one kernel launch; the multi-diagonal heads need the
spatial-major permutation and share a second plan: at most two launches per layer.

Choices where the paper is silent (no official code exists), written here as the defaults:
``diag_window = 1.0`` and ``multi_window = 1.0`` (bands of ±P tokens: density ≈ 2/T each), ``stripe_frames = 1``
(density ≈ 1/T), ``block_size = 128``, no dense warm-up steps or layers (``dense_steps = dense_layers = 0``:
the searched configuration already keeps the heads that need it dense). Block-level patterns are supersets of the
token-level bands (a block pair is kept when any of its token pairs lies in the band).
Measured block density per mode (Wan2.1 81 frames, 128-blocks): 480p diagonal 0.103, multi-diagonal 0.103,
vertical-stripe 0.051; 720p 0.097, 0.097, 0.049.

Configuration: a JSON file (one per model, resolution and frame count) written by ``dit-sparse search``::

    {"format": "dit-sparse/svdit", "version": 2, "heads": 12, "num_layers": 30,
     "model": {"class": "WanTransformer3DModel", "pipeline": "WanPipeline", "fingerprint": "3f0c..."},
     "layout": {"frames": 21, "height": 30, "width": 52, "text_len": 0, "text_where": "none"},
     "params": {"diag_window": 1.0, "multi_window": 1.0, "stripe_frames": 1, "block_size": 128},
     "layers": {"0": ["dense", "diagonal", ...], ...}, ...}

``layers`` is keyed by the self-attention layer index; ``params`` (when present) override the config fields,
because the search measured its errors with them. Without a file every head runs ``default_mode`` (``dense``).
A pipeline with several transformers (Wan 2.2's experts ``transformer`` and ``transformer_2``) gets one section per
component, each with the keys above but ``params``: ``{"transformers": {"transformer": {...}, "transformer_2":
{...}}, "params": ...}``; a file without ``transformers`` (every version-1 file) is the section of ``transformer``.
``model`` (class and :func:`config_fingerprint`) and ``layout`` record what the search ran on; where present they
are checked against the transformer (:meth:`Svdit.check_transformer`) and each call's layout, with a clear error on a
mismatch. Under Ulysses context parallelism a rank holds a slice of each layer's heads: it runs the modes
``[head_offset : head_offset + H_local]`` of the file's ``H`` (``StepContext.head_offset``, ``layer_heads``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_sparse.files import atomic_write_json
from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Kernel, Method, MethodConfig, register
from dit_sparse.plan import HEAD_DENSE, HEAD_PLANNED, HEAD_SKIP, BlockPlan, add_text
from dit_sparse.state import StepContext

MODES = ("dense", "diagonal", "multi_diagonal", "vertical_stripe", "skip")
SPARSE_MODES = ("diagonal", "multi_diagonal", "vertical_stripe", "skip")
CONFIG_FORMAT = "dit-sparse/svdit"
_GEOMETRY = ("diag_window", "multi_window", "stripe_frames", "block_size")


class SvditConfigError(ValueError):
    """A Sparse-vDiT configuration file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class SvditConfig(MethodConfig):
    """Hyper-parameters of ``svdit``.

    Attributes:
        config: path of the JSON configuration written by ``dit-sparse search`` (default None: every head runs
            ``default_mode``).
        diag_window: half-width of the diagonal band in frames' worth of tokens (default 1.0).
        multi_window: half-width of the multi-diagonal band (spatial-major order) in frames' worth of tokens
            (default 1.0).
        stripe_frames: leading frames whose tokens are the vertical stripes (default 1).
        default_mode: mode of every head when ``config`` is None (default ``"dense"``).
        dense_steps, dense_layers: default 0 (the search decides per head).
    """

    config: str | Path | None = None
    diag_window: float = 1.0
    multi_window: float = 1.0
    stripe_frames: int = 1
    default_mode: str = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.config is not None:
            object.__setattr__(self, "config", str(self.config))
        if not self.diag_window > 0 or not self.multi_window > 0:
            raise ValueError(
                f"SvditConfig windows must be > 0, got diag_window={self.diag_window!r}, "
                f"multi_window={self.multi_window!r}"
            )
        if self.stripe_frames < 1:
            raise ValueError(f"SvditConfig.stripe_frames must be >= 1, got {self.stripe_frames!r}")
        if self.default_mode not in MODES:
            raise ValueError(f"SvditConfig.default_mode must be one of {', '.join(MODES)}, got {self.default_mode!r}")


# ---------------------------------------------------------------------------------------------- geometry
def spatial_major_permutation(layout: TokenLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """Permutation listing video tokens position by position (all frames of position 0, then position 1, ...)."""
    return layout.tile_permutation((layout.frames, 1, 1), device=device)


def _band(n: int, block: int, half_width: int, device: torch.device | str | None) -> torch.Tensor:
    """``[M, M]``: block pairs holding a token pair within ``half_width`` of each other (same token order)."""
    m = -(-n // block)
    start = torch.arange(m, device=device) * block
    end = torch.clamp(start + block, max=n) - 1
    gap = torch.maximum(start[None, :] - end[:, None], start[:, None] - end[None, :]).clamp(min=0)
    return gap <= half_width


def mode_block_mask(
    mode: str,
    layout: TokenLayout,
    block: int,
    diag_window: float = 1.0,
    multi_window: float = 1.0,
    stripe_frames: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[M, M]`` block mask of one mode, text included. ``multi_diagonal`` is in spatial-major order
    (:func:`spatial_major_permutation`, which keeps text in place); every other mode in the original order."""
    n, p = layout.seq_len, layout.tokens_per_frame
    m = -(-n // block)
    if mode == "dense":
        return torch.ones(m, m, dtype=torch.bool, device=device)
    if mode == "skip":
        return torch.zeros(m, m, dtype=torch.bool, device=device)
    if mode == "diagonal":
        mask = _band(n, block, math.ceil(diag_window * p), device)
    elif mode == "multi_diagonal":
        mask = _band(n, block, math.ceil(multi_window * p), device)
    elif mode == "vertical_stripe":
        v0 = layout.video_start
        v1 = v0 + min(stripe_frames, layout.frames) * p
        start = torch.arange(m, device=device) * block
        cols = (start < v1) & (start + block > v0)
        mask = cols[None, :].expand(m, m).clone()
    else:
        raise ValueError(f"unknown Sparse-vDiT mode {mode!r}; modes: {', '.join(MODES)}")
    return add_text(mask, layout, block, block)


_HEAD_MODE = {"dense": HEAD_DENSE, "skip": HEAD_SKIP}


def build_group_plan(
    modes: list[str],
    layout: TokenLayout,
    block: int,
    diag_window: float = 1.0,
    multi_window: float = 1.0,
    stripe_frames: int = 1,
    device: torch.device | str | None = None,
) -> BlockPlan:
    """One plan for heads that share a token order: per-head block lists, ``head_mode`` for dense/skip heads.

    ``modes`` must be all ``multi_diagonal`` (the plan then carries the spatial-major permutation) or contain none.
    """
    multi = [mode == "multi_diagonal" for mode in modes]
    if any(multi) and not all(multi):
        raise ValueError("multi_diagonal heads need their own plan (another token order): group the heads first")
    cache: dict[str, torch.Tensor] = {}
    for mode in set(modes):
        cache[mode] = mode_block_mask(mode, layout, block, diag_window, multi_window, stripe_frames, device)
    mask = torch.stack([cache[mode] for mode in modes])  # [H, M, M]
    perm = spatial_major_permutation(layout, device) if all(multi) and modes else None
    head_mode = tuple(_HEAD_MODE.get(mode, HEAD_PLANNED) for mode in modes)
    return BlockPlan.from_block_mask(mask, layout.seq_len, block, perm=perm, head_mode=head_mode)


def group_heads(modes: list[str]) -> list[tuple[list[int], list[str]]]:
    """Heads per launch: those in the original token order first, then the multi-diagonal ones (empty groups and
    groups of skipped heads only are dropped: they launch nothing)."""
    groups = []
    for pick in (lambda m: m != "multi_diagonal", lambda m: m == "multi_diagonal"):
        idx = [h for h, mode in enumerate(modes) if pick(mode)]
        if idx and any(modes[h] != "skip" for h in idx):
            groups.append((idx, [modes[h] for h in idx]))
    return groups


def modes_density(
    modes: list[str], layout: TokenLayout, block: int, device: torch.device | str | None = None, **geometry: Any
) -> float:
    """Mean fraction of the attention matrix a layer with these head modes computes (skipped heads count 0)."""
    total = 0.0
    for idx, group in group_heads(modes):
        total += build_group_plan(group, layout, block, device=device, **geometry).density() * len(idx)
    return total / max(1, len(modes))


# ---------------------------------------------------------------------------------------------- config files
def config_fingerprint(model: nn.Module) -> str:
    """A short hash of a transformer's Diffusers config (its architecture; private ``_`` keys left out)."""
    config = {k: v for k, v in dict(getattr(model, "config", {})).items() if not str(k).startswith("_")}
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def layout_record(layout: TokenLayout) -> dict[str, Any]:
    """The part of a layout a configuration is searched for: the latent grid and the text tokens."""
    return {
        "frames": layout.frames,
        "height": layout.height,
        "width": layout.width,
        "text_len": layout.text_len,
        "text_where": layout.text_where,
    }


def config_sections(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pipeline component, its section of a configuration: ``data["transformers"]``, or ``{"transformer": data}``
    for a single-transformer file."""
    sections = data.get("transformers")
    return dict(sections) if sections is not None else {"transformer": data}


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a Sparse-vDiT JSON configuration; raises :class:`SvditConfigError` with the reason."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SvditConfigError(f"cannot read Sparse-vDiT config {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SvditConfigError(f"Sparse-vDiT config {str(path)!r} is not valid JSON: {exc}") from exc
    validate_config(data, source=str(path))
    if data.get("complete") is False:
        raise SvditConfigError(
            f"Sparse-vDiT config {str(path)!r} is an unfinished search: rerun `dit-sparse search` with the same --out "
            "to resume it"
        )
    return data


def validate_config(data: Any, source: str = "<config>") -> None:
    """Check the structure of a configuration (sections, modes, head counts, layer coverage, params)."""
    where = f"Sparse-vDiT config {source!r}"
    if not isinstance(data, dict):
        raise SvditConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    fmt = data.get("format", CONFIG_FORMAT)
    if fmt != CONFIG_FORMAT:
        raise SvditConfigError(f"{where} has format {fmt!r}, expected {CONFIG_FORMAT!r}")
    params = data.get("params", {})
    if not isinstance(params, dict) or set(params) - set(_GEOMETRY):
        raise SvditConfigError(f"{where}: 'params' may set only {', '.join(_GEOMETRY)}, got {params!r}")
    sections = data.get("transformers")
    if sections is None:
        _validate_section(data, where)
        return
    if not isinstance(sections, dict) or not sections or not all(isinstance(v, dict) for v in sections.values()):
        raise SvditConfigError(f"{where}: 'transformers' must map pipeline components to sections, got {sections!r}")
    if "layers" in data:
        raise SvditConfigError(f"{where} has both 'layers' and per-transformer sections: keep one of them")
    for name, section in sections.items():
        _validate_section(section, f"{where} ({name})")


def _validate_section(data: dict[str, Any], where: str) -> None:
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise SvditConfigError(f"{where} needs a non-empty 'layers' object: {{layer index: [mode per head]}}")
    heads = data.get("heads")
    if heads is not None and (not isinstance(heads, int) or heads < 1):
        raise SvditConfigError(f"{where}: 'heads' must be a positive integer, got {heads!r}")
    for key, modes in layers.items():
        if not str(key).isdigit():
            raise SvditConfigError(f"{where}: layer keys are self-attention layer indices (0, 1, ...), got {key!r}")
        if not isinstance(modes, list) or not modes:
            raise SvditConfigError(f"{where}: layer {key} must list one mode per head, got {modes!r}")
        bad = sorted({m for m in modes if m not in MODES}, key=str)
        if bad:
            raise SvditConfigError(
                f"{where}: layer {key} has unknown mode(s) {', '.join(map(repr, bad))}; modes: {', '.join(MODES)}"
            )
        if heads is not None and len(modes) != heads:
            raise SvditConfigError(f"{where}: layer {key} lists {len(modes)} heads, the config says heads={heads}")
    num_layers = data.get("num_layers")
    if num_layers is not None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise SvditConfigError(f"{where}: 'num_layers' must be a positive integer, got {num_layers!r}")
        missing = [i for i in range(num_layers) if str(i) not in layers]
        if missing:
            raise SvditConfigError(
                f"{where} covers {len(layers)} of num_layers={num_layers} layers; missing: {missing[:10]}"
                + (" ..." if len(missing) > 10 else "")
            )
    for key in ("layout", "model"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise SvditConfigError(f"{where}: {key!r} must be an object, got {data[key]!r}")


def save_config(data: dict[str, Any], path: str | Path) -> None:
    """Write a configuration atomically (validated first)."""
    validate_config(data, source=str(path))
    atomic_write_json(path, data)


# ---------------------------------------------------------------------------------------------- the method
@register
class Svdit(Method):
    """Sparse-vDiT: searched per-(layer, head) modes, heads of a mode fused (see the module docstring)."""

    name = "svdit"
    config_cls = SvditConfig

    def __init__(self, config: SvditConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.file: dict[str, Any] | None = load_config(cfg.config) if cfg.config is not None else None
        params = dict(self.file.get("params", {})) if self.file else {}
        if "block_size" in params and params["block_size"] != cfg.block_size:
            self.config = dataclasses.replace(cfg, block_size=int(params["block_size"]))
        self.geometry = {
            "diag_window": float(params.get("diag_window", cfg.diag_window)),
            "multi_window": float(params.get("multi_window", cfg.multi_window)),
            "stripe_frames": int(params.get("stripe_frames", cfg.stripe_frames)),
        }
        self._groups: dict[tuple, list[tuple[torch.Tensor, list[int], BlockPlan]]] = {}
        self._warned = False

    def _where(self, transformer: str) -> str:
        suffix = f" ({transformer})" if "transformers" in (self.file or {}) else ""
        return f"Sparse-vDiT config {self.config.config!r}{suffix}"

    def section(self, transformer: str = "transformer") -> dict[str, Any]:
        """The configuration's section of one pipeline component (``transformer``, ``transformer_2``)."""
        assert self.file is not None
        sections = config_sections(self.file)
        if transformer not in sections:
            raise SvditConfigError(
                f"Sparse-vDiT config {self.config.config!r} has no section for {transformer!r} (it has "
                f"{', '.join(sections)}): it was searched for a pipeline with other transformers"
            )
        return sections[transformer]

    def check_transformer(self, transformer: str, model: nn.Module) -> None:
        """Refuse a transformer other than the one the configuration was searched on (its class and
        :func:`config_fingerprint`, where the file records them)."""
        if self.file is None:
            return
        recorded = self.section(transformer).get("model") or {}
        actual = {"class": type(model).__name__, "fingerprint": config_fingerprint(model)}
        if any(recorded.get(key) not in (None, value) for key, value in actual.items()):
            raise SvditConfigError(
                f"{self._where(transformer)} was searched on a {recorded.get('class')} with config fingerprint "
                f"{recorded.get('fingerprint')}, this {transformer} is a {actual['class']} with fingerprint "
                f"{actual['fingerprint']}: run `dit-sparse search` on this model"
            )

    def layer_modes(
        self,
        layer_index: int,
        heads: int,
        transformer: str = "transformer",
        head_offset: int = 0,
        layer_heads: int | None = None,
    ) -> list[str]:
        """The modes of the call's ``heads`` heads, from ``head_offset`` on among the layer's ``layer_heads`` (default:
        ``heads``; under Ulysses context parallelism the rank's slice, :class:`StepContext`), checked against the
        file's head count."""
        if self.file is None:
            if not self._warned:
                warnings.warn(
                    "svdit runs without a configuration: every head is "
                    f"{self.config.default_mode!r}; run `dit-sparse search` and pass config=PATH",
                    stacklevel=2,
                )
                self._warned = True
            return [self.config.default_mode] * heads
        layers = self.section(transformer)["layers"]
        modes = layers.get(str(layer_index))
        if modes is None:
            raise SvditConfigError(
                f"{self._where(transformer)} has no entry for self-attention layer {layer_index} "
                f"(it covers layers {sorted(int(k) for k in layers)}): it was searched for another model"
            )
        total = heads if layer_heads is None else layer_heads
        if len(modes) != total:
            raise SvditConfigError(
                f"{self._where(transformer)} lists {len(modes)} heads for layer {layer_index}, the "
                f"model has {total}: it was searched for another model"
            )
        return list(modes[head_offset : head_offset + heads])

    def check_layout(self, layout: TokenLayout, transformer: str = "transformer") -> None:
        """Refuse a call whose latent grid or text tokens differ from those the configuration was searched on."""
        if self.file is None:
            return
        recorded, actual = self.section(transformer).get("layout"), layout_record(layout)
        if recorded is not None and {k: recorded.get(k) for k in actual} != actual:
            grid = lambda d: f"{d['frames']}x{d['height']}x{d['width']} grid, {d['text_len']} text tokens"  # noqa: E731
            raise SvditConfigError(
                f"{self._where(transformer)} was searched on a {grid(recorded)}; this call has a {grid(actual)}: "
                "search again at this frame count and resolution (dit-sparse search --frames --height --width)"
            )

    def static_key(self, layout: TokenLayout, heads: int, ctx: StepContext) -> tuple:
        """Plans differ per layer and rank: the layout, head count, layer (transformer, index) and head offset."""
        return (*super().static_key(layout, heads, ctx), ctx.layer_key, ctx.head_offset)

    def layer_plans(
        self, q: torch.Tensor, layout: TokenLayout, ctx: StepContext
    ) -> list[tuple[torch.Tensor, list[int], BlockPlan]]:
        """(head index tensor, head list, plan) per kernel launch of this layer; built once and cached."""
        heads = q.shape[1]
        key = (*self.static_key(layout, heads, ctx), q.device)
        groups = self._groups.get(key)
        if groups is None:
            self.check_layout(layout, ctx.transformer)
            modes = self.layer_modes(ctx.layer_index, heads, ctx.transformer, ctx.head_offset, ctx.layer_heads)
            groups = []
            for idx, group in group_heads(modes):
                plan = build_group_plan(group, layout, self.config.block_size, device=q.device, **self.geometry)
                groups.append((torch.tensor(idx, device=q.device), idx, plan.check()))
            self._groups[key] = groups
        return groups

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        """The layer's plan when one launch covers every head (no multi-diagonal heads, or only those)."""
        heads = q.shape[1]
        self.check_layout(layout, ctx.transformer)
        modes = self.layer_modes(ctx.layer_index, heads, ctx.transformer, ctx.head_offset, ctx.layer_heads)
        if len({m == "multi_diagonal" for m in modes}) > 1:
            raise ValueError(
                f"layer {ctx.layer_index} mixes multi-diagonal and other heads: two plans (see Svdit.layer_plans)"
            )
        return build_group_plan(modes, layout, self.config.block_size, device=q.device, **self.geometry)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, ctx: StepContext, kernel: Kernel
    ) -> torch.Tensor:
        """One kernel launch per head group (at most two per layer); skipped heads output zeros."""
        groups = self.layer_plans(q, layout, ctx)
        heads = q.shape[1]
        if len(groups) == 1 and len(groups[0][1]) == heads:
            out, _ = kernel(q, k, v, groups[0][2], False)
            return out
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        for idx_t, _, plan in groups:
            o, _ = kernel(q.index_select(1, idx_t), k.index_select(1, idx_t), v.index_select(1, idx_t), plan, False)
            out.index_copy_(1, idx_t, o)
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(self.geometry)
        if self.file is not None:
            counts: dict[str, int] = {}
            for section in config_sections(self.file).values():
                for mode in itertools.chain.from_iterable(section["layers"].values()):
                    counts[mode] = counts.get(mode, 0) + 1
            info["modes"] = counts
        return info
