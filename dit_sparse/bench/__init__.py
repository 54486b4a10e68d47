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

from dit_sparse.bench.driver import run, time_compiled
from dit_sparse.bench.forward import (
    COMPILE_MODES,
    attention_share,
    attention_time,
    compile_model,
    time_forward,
)
from dit_sparse.bench.forward import _query_key as _query_key  # used by the tests
from dit_sparse.bench.forward import _step as _step
from dit_sparse.bench.models import (
    HUNYUAN_PROMPT_TOKENS,
    HUNYUAN_TEXT_TOKENS,
    MODELS,
    QUICK_MODELS,
    QUICK_REPEATS,
    ModelSpec,
    Shape,
    build_model,
)
from dit_sparse.bench.models import _wan_inputs as _wan_inputs
from dit_sparse.bench.results import BenchRow, format_table, write_results

__all__ = [
    "COMPILE_MODES",
    "HUNYUAN_PROMPT_TOKENS",
    "HUNYUAN_TEXT_TOKENS",
    "MODELS",
    "QUICK_MODELS",
    "QUICK_REPEATS",
    "BenchRow",
    "ModelSpec",
    "Shape",
    "attention_share",
    "attention_time",
    "build_model",
    "compile_model",
    "format_table",
    "run",
    "time_compiled",
    "time_forward",
    "write_results",
]
