"""End-to-end speed: one transformer forward of full-size video DiTs at their real shapes, dense vs each method.

Each transformer is built from its published Diffusers config (``ModelSpec.config``, source in ``ModelSpec.source``)
with random weights, directly on the GPU, cast the way ``from_pretrained(torch_dtype=bf16)`` casts (modules in the
class's ``_keep_in_fp32_modules`` stay fp32, non-persistent buffers such as Wan's RoPE tables keep their own dtype);
no download. Where the full model is too slow to time within the GPU budget, a stated subset of its blocks is built
(``ModelSpec.subset``, e.g. fewer ``num_layers``); the note is printed with the results. Inputs have the real shapes
and are made the way the model's pipeline makes them (latent padding, RoPE tables, text masks).

Steps: every forward (warm-up, timed, report) runs inside ``model.cache_context("cond", step_index=i)`` with ``i``
counting up from 0 after each ``dit_sparse.apply``, so each forward is one fresh denoising step of one CFG pass (the
pipeline's own way of naming steps, see ``GenerationState``). Without it, repeated forwards at the same timestep would
count as extra CFG passes of a single step, and dynamic methods would never re-plan as they do in a real run. The
timestep stays fixed (a rising one would start a new generation); ``dense_steps=0`` so every step is sparse.

Timing: CUDA events, warm-up excluded, median of ``repeats``; the dense baseline is the model's own processors (torch
SDPA as Diffusers runs it), measured in the same process. For each method the report gives the forward time, the
speedup, the method's density over all self-attention calls (dense layers count 1), the attention share ``a`` of the
dense forward and the Amdahl limit ``1 / ((1 - a) + a * density)``, and the fraction reached. A method whose steps
differ in cost (``cycle_steps > 1``: Re-ttention's dense refresh every few steps, AdaSpa's search every
``search_interval`` steps) is timed over whole cycles and reported with the mean forward time and the density over
one cycle (refresh steps count 1 + sparse density; a search step counts its plan's density, its scoring pass shows
in the time only).

``compile="blocks"`` / ``"full"`` (``--compile``): after a model's eager figures, the same model is compiled the way
users compile it (``blocks``: regional, ``transformer.compile_repeated_blocks()`` where the class defines
``_repeated_blocks``, else ``block.compile()`` per block; ``full``: ``torch.compile(transformer)``; inductor,
``dynamic=False``) and dense and every method are timed again in the same run, side by side with the eager figures:
dense = the model's own processors compiled (SDPA inside the graph), methods = dit_sparse applied (its self-attention
call is a graph break that runs eagerly). At least 2 untimed warm-up forwards per method absorb compilation (the first
forward's time, compilation included, is reported; so is any graph compiled while timing). The compiled dense
attention share is the dense forward's SDPA time (CUDA events in the eager forward: the compiled graph runs the same SDPA
kernels) over the compiled dense forward time; compiled speedups are given against the compiled dense forward and the
eager one, and the Amdahl limit uses the compiled share.
CUDA only: ``dit-sparse bench`` / ``python benchmarks/e2e.py [--quick] [--compile blocks]``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dit_sparse.timing import Timer

Shape = tuple[int, int, int]  # (frames, height, width) in pixels
MakeInputs = Callable[[Any, Shape, torch.device, torch.dtype], tuple[dict[str, Any], int]]


@dataclass(frozen=True)
class ModelSpec:
    """A full-size transformer: its Diffusers class, published config, and how to make inputs of a named shape.

    Attributes:
        cls_name: the Diffusers class (``diffusers.<cls_name>``).
        config: the published config (constructor kwargs), unchanged.
        shapes: shape name -> (frames, height, width) in pixels.
        make_inputs: (model, shape, device, dtype) -> (forward kwargs, self-attention sequence length).
        layers_attr: attribute holding the (first) block list.
        note: printed with the results (what is timed, input choices).
        subset: config overrides that the benchmark times instead of the full model (e.g. ``{"num_layers": 10}``).
        quick_subset: overrides used by ``quick=True`` on top of ``subset``.
        source: where the config values come from.
    """

    cls_name: str
    config: dict[str, Any]
    shapes: dict[str, Shape]
    make_inputs: MakeInputs
    layers_attr: str = "blocks"
    note: str = ""
    subset: dict[str, Any] = field(default_factory=dict)
    quick_subset: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def build_config(self, quick: bool = False) -> dict[str, Any]:
        """The config that is built: the published one with ``subset`` (and ``quick_subset``) applied."""
        return {**self.config, **self.subset, **(self.quick_subset if quick else {})}

    def describe(self, quick: bool = False) -> str:
        """The note printed with the results: the timed subset (if any) and ``note``."""
        cfg = self.build_config(quick)
        parts = [f"{k}={cfg[k]} of {self.config.get(k)}" for k in cfg if cfg[k] != self.config.get(k)]
        text = f"timed subset: {', '.join(parts)} (random weights)" if parts else "full model (random weights)"
        return f"{text}; {self.note}" if self.note else text


# ------------------------------------------------------------------------------------------------ inputs per family


def _wan_inputs(model: Any, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    """WanPipeline: latent (B, C, (F-1)/4+1, H/8, W/8), 512 text tokens (cross-attention only)."""
    frames, height, width = shape
    cfg = model.config
    lat = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    pt, ph, pw = cfg.patch_size
    inputs = {
        "hidden_states": torch.randn(lat, device=device, dtype=dtype),
        "timestep": torch.tensor([999.0], device=device),
        "encoder_hidden_states": torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype),
        "return_dict": False,
    }
    return inputs, (lat[2] // pt) * (lat[3] // ph) * (lat[4] // pw)


def _cogvideox_inputs(model: Any, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    """CogVideoXPipeline: latent (B, F', C, H/8, W/8) with F' padded to a multiple of ``patch_size_t``; RoPE tables
    from the pipeline's own ``_prepare_rotary_positional_embeddings`` (a pipeline holding only this transformer: with
    no VAE it uses the real scale factors 8 and 4); ``max_text_seq_length`` text tokens joined as a prefix."""
    from diffusers import CogVideoXPipeline

    frames, height, width = shape
    cfg = model.config
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    pt = cfg.patch_size_t or 1
    latent_frames += -latent_frames % pt  # the pipeline pads the latent frames for CogVideoX 1.5
    s, p = pipe.vae_scale_factor_spatial, cfg.patch_size
    rope = None
    if cfg.use_rotary_positional_embeddings:
        rope = pipe._prepare_rotary_positional_embeddings(height, width, latent_frames, device)
    inputs = {
        "hidden_states": torch.randn(
            1, latent_frames, cfg.in_channels, height // s, width // s, device=device, dtype=dtype
        ),
        "encoder_hidden_states": torch.randn(
            1, cfg.max_text_seq_length, cfg.text_embed_dim, device=device, dtype=dtype
        ),
        "timestep": torch.tensor([999], device=device),
        "image_rotary_emb": rope,
        "return_dict": False,
    }
    video = (latent_frames // pt) * (height // s // p) * (width // s // p)
    return inputs, cfg.max_text_seq_length + video


HUNYUAN_TEXT_TOKENS = 256  # HunyuanVideoPipeline max_sequence_length (after cropping the prompt template)
HUNYUAN_PROMPT_TOKENS = 64  # valid (unpadded) prompt tokens; the other text keys are masked as padding


def _hunyuan_inputs(model: Any, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    """HunyuanVideoPipeline: latent (B, C, (F-1)/4+1, H/8, W/8); 256 text tokens joined as a suffix with a padding
    mask (first ``HUNYUAN_PROMPT_TOKENS`` valid); CLIP pooled projection; distilled guidance 6.0 x 1000."""
    frames, height, width = shape
    cfg = model.config
    lat = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    mask = torch.zeros(1, HUNYUAN_TEXT_TOKENS, device=device, dtype=dtype)
    mask[:, :HUNYUAN_PROMPT_TOKENS] = 1
    inputs = {
        "hidden_states": torch.randn(lat, device=device, dtype=dtype),
        "timestep": torch.tensor([999.0], device=device),
        "encoder_hidden_states": torch.randn(1, HUNYUAN_TEXT_TOKENS, cfg.text_embed_dim, device=device, dtype=dtype),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype),
        "guidance": torch.tensor([6.0 * 1000.0], device=device, dtype=dtype),
        "return_dict": False,
    }
    p, pt = cfg.patch_size, cfg.patch_size_t
    video = (lat[2] // pt) * (lat[3] // p) * (lat[4] // p)
    return inputs, video + HUNYUAN_TEXT_TOKENS


# ------------------------------------------------------------------------------------------------ published configs


def _wan_config(heads: int, ffn: int, layers: int) -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


_WAN_SOURCE = "diffusers scripts/convert_wan_to_diffusers.py (Wan-T2V-1.3B / Wan-T2V-14B diffusers_config)"
_WAN_SHAPES: dict[str, Shape] = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}

COGVIDEOX15_5B: dict[str, Any] = dict(
    num_attention_heads=48,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=512,
    ofs_embed_dim=None,
    text_embed_dim=4096,
    num_layers=42,
    dropout=0.0,
    attention_bias=True,
    sample_width=300,
    sample_height=300,
    sample_frames=81,
    patch_size=2,
    patch_size_t=2,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=False,
    patch_bias=False,
)

HUNYUAN_VIDEO: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
    image_condition_type=None,
)

MODELS: dict[str, ModelSpec] = {
    "wan2.1-1.3b": ModelSpec(
        "WanTransformer3DModel",
        _wan_config(12, 8960, 30),
        _WAN_SHAPES,
        _wan_inputs,
        source=_WAN_SOURCE,
    ),
    "wan2.1-14b": ModelSpec(
        "WanTransformer3DModel",
        _wan_config(40, 13824, 40),
        _WAN_SHAPES,
        _wan_inputs,
        note="the full model takes ~8 s per forward at 720p on an H100; all blocks are identical, so a per-forward "
        "speedup of the subset slightly understates the full model's (embeddings/head weigh more)",
        subset={"num_layers": 10},
        quick_subset={"num_layers": 4},
        source=_WAN_SOURCE,
    ),
    "cogvideox1.5-5b": ModelSpec(
        "CogVideoXTransformer3DModel",
        COGVIDEOX15_5B,
        {"768x1360": (81, 768, 1360)},
        _cogvideox_inputs,
        layers_attr="transformer_blocks",
        note="T2V at 1360x768 (the resolution the T2V checkpoint was trained at), 81 frames -> 21 latent frames padded "
        "to 22 as the pipeline does -> 11 x 48 x 85 = 44,880 video tokens after 226 text tokens",
        quick_subset={"num_layers": 10},
        source="diffusers scripts/convert_cogvideox_to_diffusers.py get_transformer_init_kwargs('1.5') + 5B args "
        "(num_layers 42, num_attention_heads 48, RoPE); other values: CogVideoXTransformer3DModel defaults; "
        "THUDM/CogVideoX1.5-5B transformer/config.json",
    ),
    "hunyuanvideo": ModelSpec(
        "HunyuanVideoTransformer3DModel",
        HUNYUAN_VIDEO,
        {"720p": (129, 720, 1280)},
        _hunyuan_inputs,
        layers_attr="transformer_blocks",
        note="the full model (20 dual + 40 single blocks) takes ~20 s per forward on an H100; the subset keeps the "
        "1:2 dual:single ratio; 720p/129 frames -> 33 x 45 x 80 = 118,800 video tokens + 256 text tokens (suffix, "
        f"{HUNYUAN_PROMPT_TOKENS} valid, rest masked as padding)",
        subset={"num_layers": 2, "num_single_layers": 4},
        quick_subset={"num_layers": 1, "num_single_layers": 2},
        source="HunyuanVideoTransformer3DModel defaults, which diffusers scripts/convert_hunyuan_video_to_diffusers.py "
        "loads the published checkpoint into (strict); hunyuanvideo-community/HunyuanVideo transformer/config.json",
    ),
}

QUICK_MODELS = ["wan2.1-1.3b", "hunyuanvideo"]  # --quick default: Wan2.1-1.3B 480p + 720p and HunyuanVideo 720p
QUICK_REPEATS = 3


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, quick: bool = False) -> Any:
    """The transformer of ``spec`` with random weights, made on ``device`` and cast like ``from_pretrained``."""
    import diffusers

    cls = getattr(diffusers, spec.cls_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**spec.build_config(quick))
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    persistent = set(model.state_dict())
    tensors = itertools.chain(model.named_parameters(), ((n, b) for n, b in model.named_buffers() if n in persistent))
    for name, tensor in tensors:
        if tensor.is_floating_point():
            target = torch.float32 if any(m in name.split(".") for m in keep) else dtype
            tensor.data = tensor.data.to(device=device, dtype=target)
    return model.to(device).eval()


def _query_key(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) of an SDPA call, positional or by keyword (Diffusers' native backend passes ``query=``)."""
    named = ("query", "key")
    return tuple(args[i] if len(args) > i else kwargs[n] for i, n in enumerate(named))  # type: ignore[return-value]


def _device_of(inputs: dict[str, Any]) -> torch.device:
    return next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))


class _SelfAttentionTimer(TorchFunctionMode):
    """Times every self-attention SDPA call (N_q == N_k >= ``min_tokens``: not the text refiner) with CUDA events
    (wall clock off CUDA)."""

    def __init__(self, min_tokens: int = 1024) -> None:
        super().__init__()
        self.min_tokens = min_tokens
        self.timer = Timer()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = _query_key(args, kwargs)
            if q.shape[-2] == k.shape[-2] >= self.min_tokens:
                start = Timer.start(q.device)
                out = func(*args, **kwargs)
                self.timer.stop(start)
                return out
        return func(*args, **kwargs)

    def total_ms(self) -> float:
        return self.timer.total()


@contextlib.contextmanager
def _step(model: Any, steps: Iterator[int]) -> Iterator[None]:
    """One denoising step of one CFG pass: ``model.cache_context("cond", step_index=next(steps))``."""
    if hasattr(model, "cache_context"):
        with model.cache_context("cond", step_index=next(steps)):
            yield
    else:
        yield


def time_forward(
    model: Any,
    inputs: dict,
    repeats: int,
    warmup: int = 2,
    steps: Iterator[int] | None = None,
    call: Callable[..., Any] | None = None,
) -> list[float]:
    """Milliseconds of ``repeats`` forwards (CUDA events; wall clock off CUDA), after ``warmup`` untimed ones; each
    forward is the next step of ``steps`` (see the module docstring). ``call`` runs the forward (default: ``model``;
    ``torch.compile(model)`` for a compiled one)."""
    steps = steps if steps is not None else itertools.count()
    call = call if call is not None else model
    device = _device_of(inputs)
    with torch.inference_mode():
        for _ in range(warmup):
            with _step(model, steps):
                call(**inputs)
        timer = Timer()
        for _ in range(repeats):
            with _step(model, steps):
                start = Timer.start(device)
                call(**inputs)
                timer.stop(start)
    return timer.values()


def _warmup_s(model: Any, inputs: dict, steps: Iterator[int], call: Callable[..., Any]) -> float:
    """Seconds of one untimed forward, synchronized (a compiled model's first one includes compilation)."""
    device = _device_of(inputs)
    start = time.perf_counter()
    with torch.inference_mode(), _step(model, steps):
        call(**inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def attention_time(
    model: Any, inputs: dict, steps: Iterator[int] | None = None, min_tokens: int = 1024
) -> tuple[float, float]:
    """(self-attention SDPA ms, forward ms) of one dense forward."""
    timer = _SelfAttentionTimer(min_tokens)
    device = _device_of(inputs)
    forward = Timer()
    with torch.inference_mode(), _step(model, steps if steps is not None else itertools.count()):
        start = Timer.start(device)
        with timer:
            model(**inputs)
        forward.stop(start)
    return timer.total_ms(), forward.total()


def attention_share(model: Any, inputs: dict, steps: Iterator[int] | None = None, min_tokens: int = 1024) -> float:
    """Fraction of one dense forward spent in self-attention SDPA calls."""
    attn, total = attention_time(model, inputs, steps, min_tokens)
    return attn / total


COMPILE_MODES = ("none", "blocks", "full")


def compile_model(model: Any, spec: ModelSpec, mode: str, **options: Any) -> Callable[..., Any]:
    """Compile ``model`` the way users do (see the module docstring); returns what runs its forward.

    ``blocks``: regional compilation in place (``model.compile_repeated_blocks(**options)`` where the class defines
    ``_repeated_blocks``, else ``block.compile(**options)`` on each block of ``spec.layers_attr``); returns ``model``.
    ``full``: returns ``torch.compile(model, **options)``. ``options`` default to ``dynamic=False``.
    """
    options = {"dynamic": False, **options}
    if mode == "blocks":
        if getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(**options)
        else:
            for block in getattr(model, spec.layers_attr):
                block.compile(**options)
        return model
    if mode == "full":
        return torch.compile(model, **options)
    raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")


@dataclass
class BenchRow:
    """One (model, shape, method) result; ``note`` says what was timed (subset of blocks, input choices)."""

    model: str
    shape: str
    tokens: int
    method: str
    params: dict
    forward_ms: float
    forward_ms_all: list[float]
    speedup: float
    density: float
    attention_share: float
    amdahl_limit: float
    fraction_of_limit: float
    extra: dict = field(default_factory=dict)
    note: str = ""
    # the same forward with the model compiled (``compile`` != "none"; see the module docstring)
    compile: str = "none"
    compiled_ms: float | None = None
    compiled_ms_all: list[float] = field(default_factory=list)
    compiled_speedup: float | None = None  # vs the compiled dense forward
    compiled_speedup_vs_eager: float | None = None  # vs the eager dense forward
    compiled_attention_share: float | None = None
    compiled_amdahl_limit: float | None = None
    compiled_fraction_of_limit: float | None = None


def _check_args(models: list[str], shapes: list[str] | None, methods: list[str]) -> list[tuple[str, dict]]:
    """Fail on unknown models/shapes/methods before any model is built; the parsed method specs."""
    from dit_sparse.methods import parse_method_spec

    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    for shape in shapes or []:
        if not any(shape in MODELS[name].shapes for name in models):
            known = sorted({s for name in models for s in MODELS[name].shapes})
            raise ValueError(f"unknown shape {shape!r} for {', '.join(models)}; known: {', '.join(known)}")
    return [parse_method_spec(m) for m in methods]


def run(
    models: list[str] | None = None,
    shapes: list[str] | None = None,
    methods: list[str] | None = None,
    repeats: int = 5,
    out: str | Path | None = None,
    command: str = "",
    *,
    quick: bool = False,
    compile: str = "none",
    device: str | torch.device | None = None,
) -> list[BenchRow]:
    """Time dense vs each method spec (``"radial"``, ``"window:window=1,1,1"``) on each model and shape.

    ``shapes`` names shapes of any of the models (a model without that shape is skipped; None: all of each model's).
    ``quick``: a light pass for a small GPU budget (about 4 minutes on an H100): models default to
    ``QUICK_MODELS``, at most ``QUICK_REPEATS`` repeats after 1 warm-up, and each model's ``quick_subset`` of blocks.
    ``compile``: ``none``, ``blocks`` or ``full``: also time every row with the model compiled (module docstring).
    ``device``: default CUDA (required); another device (tests: ``"cpu"``, fp32) times with the wall clock.
    """
    import dit_sparse
    from dit_sparse.methods import get_method

    models = list(models or (QUICK_MODELS if quick else ["wan2.1-1.3b"]))
    methods = list(methods or ["window", "radial", "rettention", "draft", "adaspa"])
    specs = _check_args(models, shapes, methods)
    if compile not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
    if device is None and not torch.cuda.is_available():
        raise RuntimeError(
            "dit_sparse.bench times CUDA kernels on full-size models and needs an NVIDIA GPU; no CUDA device is "
            f"visible here (torch {torch.__version__}). Use `dit-sparse eval` on the CPU."
        )
    device = torch.device(device if device is not None else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup = 1 if quick else 2
    if quick:
        repeats = min(repeats, QUICK_REPEATS)
    rows: list[BenchRow] = []
    for name in models:
        spec = MODELS[name]
        note = spec.describe(quick)
        print(f"== {name}: {note}", flush=True)
        model = build_model(spec, device, dtype, quick)
        for shape_name in [s for s in shapes or list(spec.shapes) if s in spec.shapes]:
            inputs, tokens = spec.make_inputs(model, spec.shapes[shape_name], device, dtype)
            steps = itertools.count()
            dense_ms = time_forward(model, inputs, repeats, warmup, steps)
            dense = statistics.median(dense_ms)
            attn_ms, attn_fwd_ms = attention_time(model, inputs, steps, min(1024, tokens))
            share = attn_ms / attn_fwd_ms
            rows.append(
                BenchRow(
                    name, shape_name, tokens, "dense", {}, dense, dense_ms, 1.0, 1.0, share, 1.0, 1.0,
                    {"attention_ms": attn_ms}, note=note,
                )
            )  # fmt: skip
            for method, params in specs:
                params = {"dense_steps": 0, **params}  # one forward = one sparse step; warm-up steps are not timed
                # steps of unequal cost (a refresh or a search every `cycle` steps): whole cycles, mean time
                cycle = get_method(method, **params).cycle_steps
                dit_sparse.apply(model, method, **params)
                try:
                    steps = itertools.count()  # a fresh generation: steps 0, 1, ... as in a real run
                    # a cycle method's step 0 is its special step (first search, refresh) and step 1 its first
                    # ordinary one, whose new plan autotunes the kernel: both warm up, then whole cycles are timed
                    ms = time_forward(
                        model, inputs, -(-repeats // cycle) * cycle, max(2, warmup) if cycle > 1 else warmup, steps
                    )
                    dit_sparse.report(model, reset=True)
                    time_forward(model, inputs, cycle, 0, steps)
                    rep = dit_sparse.report(model, reset=True)
                finally:
                    dit_sparse.remove(model)
                density = rep.effective_density
                limit = 1.0 / ((1.0 - share) + share * density)
                forward_ms = statistics.median(ms) if cycle == 1 else statistics.mean(ms)
                speedup = dense / forward_ms
                rows.append(
                    BenchRow(
                        name,
                        shape_name,
                        tokens,
                        method,
                        params,
                        forward_ms,
                        ms,
                        speedup,
                        density,
                        share,
                        limit,
                        speedup / limit,
                        {"sparse_calls": rep.sparse_calls, "calls": rep.calls, "cycle_steps": cycle},
                        note,
                    )
                )
            print(format_table([r for r in rows if r.model == name and r.shape == shape_name]), flush=True)
            del inputs
        if compile != "none":
            time_compiled(model, spec, [r for r in rows if r.model == name], compile, repeats, warmup, device, dtype)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out is not None:
        write_results(rows, Path(out), command)
    return rows


def time_compiled(
    model: Any,
    spec: ModelSpec,
    rows: list[BenchRow],
    mode: str,
    repeats: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Compile ``model`` (:func:`compile_model`) and time again every row of its eager pass (dense first per shape,
    each method with the same parameters), filling the rows' ``compiled_*`` fields (see the module docstring). A row
    that fails compiled keeps its eager figures and gets ``extra["compiled_error"]`` (one expensive run keeps the rest).
    """
    from torch._dynamo.utils import counters

    import dit_sparse

    call = compile_model(model, spec, mode)
    warmup = max(2, warmup)
    for shape_name in dict.fromkeys(r.shape for r in rows):
        torch._dynamo.reset()  # static shapes: the previous shape's graphs are of no further use
        shape_rows = [r for r in rows if r.shape == shape_name]
        dense_row = shape_rows[0]
        assert dense_row.method == "dense", "each shape's rows start with its dense row"
        inputs, _ = spec.make_inputs(model, spec.shapes[shape_name], device, dtype)
        for row in shape_rows:
            sparse = row.method != "dense"
            row.compile = mode
            if sparse:
                dit_sparse.apply(model, row.method, **row.params)
            try:
                steps = itertools.count()
                first = [round(_warmup_s(model, inputs, steps, call), 3) for _ in range(warmup)]
                graphs = counters["stats"]["unique_graphs"]
                cycle = max(1, int(row.extra.get("cycle_steps", 1)))
                ms = time_forward(model, inputs, -(-repeats // cycle) * cycle, 0, steps, call)
                graphs = counters["stats"]["unique_graphs"] - graphs
            except Exception as exc:  # noqa: BLE001 - reported in the row and the table
                row.extra["compiled_error"] = f"{type(exc).__name__}: {exc}"[:1000]
                print(f"!! {row.model} {row.shape} {row.method} compiled ({mode}) failed: {row.extra['compiled_error']}",
                      flush=True)  # fmt: skip
                continue
            finally:
                if sparse:
                    dit_sparse.remove(model)
            row.compiled_ms_all = ms
            row.compiled_ms = statistics.median(ms) if cycle == 1 else statistics.mean(ms)
            row.extra["compiled_warmup_s"] = first
            row.extra["compiled_graphs_while_timed"] = graphs
        dense = dense_row.compiled_ms
        if dense is None:
            continue
        share = min(1.0, dense_row.extra.get("attention_ms", dense_row.attention_share * dense_row.forward_ms) / dense)
        for row in shape_rows:
            if row.compiled_ms is None:
                continue
            row.compiled_speedup = dense / row.compiled_ms
            row.compiled_speedup_vs_eager = dense_row.forward_ms / row.compiled_ms
            row.compiled_attention_share = share
            row.compiled_amdahl_limit = 1.0 / ((1.0 - share) + share * row.density)
            row.compiled_fraction_of_limit = row.compiled_speedup / row.compiled_amdahl_limit
        print(format_table(shape_rows), flush=True)
        del inputs


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table of the rows, followed by each model's note (with compiled rows: eager and compiled figures
    side by side, and what the compiled warm-up forwards took)."""
    if any(r.compiled_ms is not None for r in rows):
        return _format_compiled(rows)
    head = "| model | shape | tokens | method | forward ms | speedup | density | attn share | Amdahl limit | of limit |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.shape} | {r.tokens} | {r.method} | {r.forward_ms:.1f} | {r.speedup:.2f}x | "
            f"{r.density:.3f} | {r.attention_share:.2f} | {r.amdahl_limit:.2f}x | {r.fraction_of_limit:.0%} |"
        )
    notes = dict.fromkeys((r.model, r.note) for r in rows if r.note)
    if notes:
        lines += ["", *(f"- {model}: {note}" for model, note in notes)]
    return "\n".join(lines)


def _format_compiled(rows: list[BenchRow]) -> str:
    head = (
        "| model | shape | tokens | method | density | eager ms | speedup | attn share | Amdahl limit | of limit | "
        "compiled ms | vs compiled dense | vs eager dense | compiled attn share | compiled Amdahl limit | of limit |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        eager = (
            f"| {r.model} | {r.shape} | {r.tokens} | {r.method} | {r.density:.3f} | {r.forward_ms:.1f} | "
            f"{r.speedup:.2f}x | {r.attention_share:.2f} | {r.amdahl_limit:.2f}x | {r.fraction_of_limit:.0%} |"
        )
        if r.compiled_ms is None:
            lines.append(eager + " - | - | - | - | - | - |")
        else:
            lines.append(
                f"{eager} {r.compiled_ms:.1f} | {r.compiled_speedup:.2f}x | {r.compiled_speedup_vs_eager:.2f}x | "
                f"{r.compiled_attention_share:.2f} | {r.compiled_amdahl_limit:.2f}x | {r.compiled_fraction_of_limit:.0%} |"
            )
    notes = [f"- {model}: {note}" for model, note in dict.fromkeys((r.model, r.note) for r in rows if r.note)]
    modes = sorted({r.compile for r in rows if r.compiled_ms is not None})
    notes.append(
        f"- compiled ({', '.join(modes)}; blocks = regional compile_repeated_blocks, full = torch.compile(transformer); "
        "inductor, dynamic=False): dense = the model's own processors compiled; methods = dit_sparse applied, their "
        "self-attention a graph break run eagerly. Untimed warm-up forwards absorb compilation; compiled attn share = "
        "eager dense SDPA time / compiled dense forward"
    )
    for (model, shape), group in itertools.groupby(rows, key=lambda r: (r.model, r.shape)):
        group = [r for r in group if r.compiled_ms is not None]
        if group:
            warm = ", ".join(
                f"{r.method} {' + '.join(f'{s:.1f}' for s in r.extra.get('compiled_warmup_s', []))} s" for r in group
            )
            extra = [f"{r.method} {r.extra['compiled_graphs_while_timed']}" for r in group
                     if r.extra.get("compiled_graphs_while_timed")]  # fmt: skip
            timed = f"; graphs compiled while timed: {', '.join(extra)}" if extra else "; no graph compiled while timed"
            notes.append(f"- {model} {shape} untimed warm-up forwards (compilation included): {warm}{timed}")
    for r in rows:
        if "compiled_error" in r.extra:
            notes.append(
                f"- {r.model} {r.shape} {r.method} compiled ({r.compile}): FAILED, {r.extra['compiled_error']}"
            )
    return "\n".join([*lines, "", *notes])


def environment() -> dict[str, Any]:
    """Device, library versions and date."""
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def write_results(rows: list[BenchRow], out: Path, command: str) -> None:
    """``out``.json (rows + environment + command + model configs) and ``out``.md (the table and notes)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    used = dict.fromkeys(r.model for r in rows)
    models = {
        m: {
            "class": MODELS[m].cls_name,
            "config": MODELS[m].config,
            "subset": MODELS[m].subset,
            "quick_subset": MODELS[m].quick_subset,
            "source": MODELS[m].source,
        }
        for m in used
        if m in MODELS
    }
    payload = {
        "environment": env,
        "command": command or " ".join(sys.argv),
        "models": models,
        "rows": [r.__dict__ for r in rows],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    md = [
        "# End-to-end transformer forward, dense vs sparse",
        "",
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}, {env['date']}",
        f"Command: `{payload['command']}`",
        "",
        format_table(rows),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
