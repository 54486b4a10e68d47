"""Per-step state: where in the denoising loop and in the model an attention call is.

``StepContext`` is what a method sees for one call. The rest is the machinery that fills it, all owned by one
:class:`Tracker` per transformer, a stateful Diffusers ``ModelHook`` in the transformer's ``HookRegistry``: the
processor and the processors it replaced, the :class:`GenerationState` (step, CFG pass, the methods' per-layer
caches), the statistics ``dit_sparse.report`` reads, and the :class:`Frame` each forward publishes to its attention
modules. Nothing here is process-wide except :mod:`dit_sparse.finder`, the first-sighting hook of the Diffusers way
(``set_attn_processor(SparseProcessor())``), which lives only until the transformer is found.

A transformer runs one forward at a time (the frame lives on its tracker, not in a thread-local stack).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dit_sparse import graph
from dit_sparse.layout import TokenLayout
from dit_sparse.timing import Timer

HOOK_NAME = "dit_sparse"
"""Name of the tracker's hook in a transformer's Diffusers ``HookRegistry``."""

SITE_ATTR = "_dit_sparse_site"
"""Attribute of a tracked attention module: its :class:`Site` (read in eager code only, never traced)."""


@dataclass
class StepContext:
    """What a method knows about the attention call it plans.

    Attributes:
        step: denoising step index in the current generation (0-based).
        timestep: the transformer's timestep for this call (None if it had none).
        cfg_pass: name of the classifier-free-guidance pass (``"cond"``, ``"uncond"``, ``"cond_uncond"`` for a
            batched pass, ``"pass<i>"`` when the pipeline does not say).
        layer: qualified name of the attention module (e.g. ``"blocks.3.attn1"``).
        layer_index: index of this self-attention module among the transformer's self-attention modules.
        layout: the TokenLayout of the call.
        cache: this (layer, cfg_pass)'s own dict for plans, LSE, softmax statistics, ...; cleared on a new generation.
        transformer: the pipeline component the layer belongs to (``"transformer"``, or ``"transformer_2"`` for Wan
            2.2's second expert): a layer is identified by ``(transformer, layer_index)``.
        num_steps: denoising steps of the pipeline's schedule (from its scheduler at the first step; None when
            dit_sparse was given a transformer without its pipeline).
        dense_steps: the dense warm-up steps in force for this generation (:meth:`MethodConfig.warmup_steps`; the
            processor always sets it; None: a context built by hand, the config's count at ``num_steps``).
        head_offset: index of the call's first head among the layer's heads (default 0). Under Ulysses context
            parallelism over ``w`` ranks (:mod:`dit_sparse.parallel`) rank ``r`` holds heads ``[r*H/w, (r+1)*H/w)``
            of the layer's ``H``, so ``r*H/w``.
        layer_heads: the layer's heads over all ranks, ``H`` (default None: the call's own, ``q.shape[1]``).
        head_group: the process group over which the layer's heads are split (Ulysses), for a method that couples
            heads (:func:`dit_sparse.parallel.gather_heads`); default None: the call holds every head.
    """

    step: int
    timestep: float | None
    cfg_pass: str
    layer: str
    layer_index: int
    layout: TokenLayout
    cache: dict[str, Any] = field(default_factory=dict)
    transformer: str = "transformer"
    num_steps: int | None = None
    dense_steps: int | None = None
    head_offset: int = 0
    layer_heads: int | None = None
    head_group: Any = None

    @property
    def layer_key(self) -> tuple[str, int]:
        """``(transformer, layer_index)``: what identifies a layer across a pipeline's transformers."""
        return (self.transformer, self.layer_index)


# --------------------------------------------------------------------------------------------------------------
# Generation state and statistics of one transformer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationState:
    """Where one transformer is in the current generation; fed once per transformer forward.

    A new generation starts (the cache is cleared) after :meth:`reset` (Diffusers resets stateful hooks after a
    pipeline call), when the input shapes change, when the timestep jumps back up, when the pipeline's step index
    goes back, or when a named CFG pass comes again in the first step (at the same step index or timestep: a pipeline
    call that raised in its first step never reached Diffusers' reset, so the next call starts anew). The step advances when the
    timestep (or the pipeline's step index) changes, or when a named pass comes again in a later step (schedulers
    that repeat a timestep); further calls at the same step are further CFG passes, named by the pipeline's cache
    context (``"cond"``, ``"uncond"``, ``"cond_uncond"``) or ``"pass<i>"`` (the i-th call of the step) when the
    pipeline names none. Calling a transformer directly again with the same timestep therefore counts as another CFG
    pass of the same step; to mark steps yourself (e.g. in a benchmark loop) wrap the call in
    ``transformer.cache_context("cond", step_index=i)``.
    """

    generation: int = 0
    step: int = -1
    timestep: float | None = None
    cfg_pass: str = ""
    pass_index: int = 0
    shape_key: Any = None
    passes: list[str] = field(default_factory=list)
    step_passes: list[str] = field(default_factory=list)
    steps_seen: int = 0
    num_steps: int | None = None
    cache: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    fresh: bool = True

    def reset(self) -> None:
        """End the current generation: the next call starts a new one with an empty cache."""
        self.fresh = True
        self.cache.clear()

    def begin(
        self, timestep: float | None, shape_key: Any, context_name: str | None = None, step_index: int | None = None
    ) -> None:
        """Account for one transformer forward (``generation`` counts up when it starts a new generation)."""
        repeated = context_name is not None and context_name in self.step_passes
        same_step = step_index == self.step if step_index is not None else timestep == self.timestep
        new = self.fresh or shape_key != self.shape_key
        if not new and step_index is not None and self.step >= 0 and step_index < self.step:
            new = True
        if not new and timestep is not None and self.timestep is not None and timestep > self.timestep:
            new = True
        if not new and repeated and same_step and self.steps_seen == 1:
            new = True  # the first step again: a call that raised in its first step never reached the reset
        if new:
            self.generation += 1
            self.step, self.timestep, self.pass_index, self.steps_seen = -1, None, 0, 0
            self.passes, self.step_passes = [], []
            self.cache.clear()
            self.fresh = False
            self.shape_key = shape_key
        if step_index is not None:
            new_step = step_index != self.step
            step = step_index
        else:
            new_step = self.step < 0 or timestep is None or timestep != self.timestep or (repeated and not new)
            # a named pass again at the same timestep after the first step: a scheduler that repeats timesteps
            step = self.step + 1 if new_step else self.step
        if new_step:
            self.steps_seen += 1
            self.step_passes = []
        self.pass_index = 0 if new_step else self.pass_index + 1
        self.step, self.timestep = step, timestep
        self.cfg_pass = context_name or f"pass{self.pass_index}"
        if self.cfg_pass not in self.passes:
            self.passes.append(self.cfg_pass)
        self.step_passes.append(self.cfg_pass)

    def layer_cache(self, layer: str, cfg_pass: str) -> dict[str, Any]:
        """The cache of one (layer, CFG pass) in this generation."""
        return self.cache.setdefault((layer, cfg_pass), {})


@dataclass
class LayerStats:
    """Counters of one self-attention module (density and errors stay tensors until read).

    ``density_sum`` counts the work that made each call's output; ``aux_sum`` the work a method did besides it
    (Re-ttention's sparse pass on a refresh step, whose statistics serve later steps), both × tokens.
    """

    calls: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    density_sum: Any = 0.0
    aux_sum: Any = 0.0
    tokens: int = 0
    timer: Timer = field(default_factory=Timer)
    out_err: list[torch.Tensor] = field(default_factory=list)
    lse_err: list[torch.Tensor] = field(default_factory=list)


@dataclass
class TransformerStats:
    """Everything ``dit_sparse.report`` reads for one transformer."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    forward_timer: Timer = field(default_factory=Timer)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int = 0
    generations: int = 0
    passes: list[str] = field(default_factory=list)
    num_steps: int | None = None
    dense_steps: int | None = None

    def layer(self, name: str) -> LayerStats:
        stats = self.layers.get(name)
        if stats is None:
            stats = self.layers[name] = LayerStats()
        return stats


# --------------------------------------------------------------------------------------------------------------
# Frames and the tracker
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Frame:
    """What one transformer forward publishes to its attention modules: layout, step, CFG pass, schedule length."""

    tracker: Tracker
    layout: TokenLayout
    step: int
    timestep: float | None
    cfg_pass: str
    num_steps: int | None = None
    start: Any = None
    _layouts: dict[tuple[int, int], TokenLayout | None] = field(default_factory=dict)

    def layout_for(self, batch: int, seq_len: int) -> TokenLayout | None:
        """The layout of a self-attention call over ``seq_len`` tokens, or None if it is not one of the video's."""
        key = (batch, seq_len)
        if key not in self._layouts:
            self._layouts[key] = self._make_layout(batch, seq_len)
        return self._layouts[key]

    def _make_layout(self, batch: int, seq_len: int) -> TokenLayout | None:
        lay = self.layout
        if seq_len == lay.seq_len:
            return dataclasses.replace(lay, batch=batch)
        if self.tracker.adapter.trims_text and lay.video_len <= seq_len < lay.seq_len:
            text = seq_len - lay.video_len
            return dataclasses.replace(lay, batch=batch, text_len=text, text_where=lay.text_where if text else "none")
        return None


@dataclass(frozen=True, eq=False)
class Site:
    """Where a tracked attention module sits: its tracker (weakly), qualified name and self-attention index; ``key``
    names it to compiled graphs (:mod:`dit_sparse.graph`)."""

    tracker_ref: weakref.ReferenceType
    name: str
    index: int | None
    key: torch.Tensor | None = None


def get_tracker(model: nn.Module) -> Tracker | None:
    """The tracker of ``model`` (None if dit_sparse is not active on it)."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return getattr(hook, "tracker", None)


def in_backward() -> bool:
    """Whether autograd's backward pass is running (gradient checkpointing re-runs blocks there)."""
    return torch._C._current_graph_task_id() != -1


def schedule_steps(pipe: Any) -> int | None:
    """Denoising steps of ``pipe``'s current schedule (its scheduler's ``num_inference_steps``), None if unknown."""
    scheduler = getattr(pipe, "scheduler", None)
    steps = getattr(scheduler, "num_inference_steps", None)
    if isinstance(steps, int) and steps > 0:
        return steps
    timesteps = getattr(scheduler, "timesteps", None)
    return len(timesteps) if timesteps is not None and len(timesteps) > 0 else None


class Tracker:
    """Everything dit_sparse keeps for one transformer, owned by the transformer (its Diffusers hook).

    Attributes:
        adapter: the model family's adapter.
        component: the pipeline component name (``"transformer"`` / ``"transformer_2"``).
        processor: the SparseProcessor serving the self-attention modules.
        originals: module name → the processor it had before :func:`dit_sparse.apply` (empty the Diffusers way).
        applied: True for :func:`dit_sparse.apply`, False when found the Diffusers way.
        state, stats: the generation state and the statistics ``dit_sparse.report`` reads.
        frame: the running (or, between forwards, the last) forward's :class:`Frame`; ``active`` says which.
        key, token: the tracker's name in compiled graphs and the token of the forward being traced
            (:mod:`dit_sparse.graph`).
    """

    def __init__(self, model: nn.Module, adapter: Any, component: str = "transformer", pipe: Any = None) -> None:
        self.model_ref = weakref.ref(model)
        self.pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self.adapter = adapter
        self.component = component
        self.processor: Any = None
        self.originals: dict[str, Any] = {}
        self.applied = False
        self.state = GenerationState()
        self.stats = TransformerStats()
        self.frame: Frame | None = None
        self.active = False
        self.hook: Any = None
        self.key = graph.tracker_key(self)
        self.token: torch.Tensor | None = None
        self._sparse_modules: list[tuple[str, nn.Module]] = []
        self._self_attention_count = 0

    @property
    def model(self) -> nn.Module:
        model = self.model_ref()
        if model is None:
            raise RuntimeError("the transformer tracked by dit_sparse no longer exists")
        return model

    # -------------------------------------------------------------- install
    @classmethod
    def attach(cls, model: nn.Module, adapter: Any, component: str = "transformer", pipe: Any = None) -> Tracker:
        """A new tracker on ``model`` (replacing an old one): its hook in the model's HookRegistry, its sites."""
        from diffusers.hooks import HookRegistry

        old = get_tracker(model)
        if old is not None:
            old.detach()
        tracker = cls(model, adapter, component, pipe)
        tracker.hook = _hook_cls()(tracker)
        HookRegistry.check_if_exists_or_initialize(model).register_hook(tracker.hook, HOOK_NAME)
        for name, module in adapter.attention_modules(model):
            tracker.add_site(name, module, adapter.is_self_attention(name))
        return tracker

    def add_site(self, name: str, module: nn.Module, self_attention: bool = True) -> Site:
        """Mark ``module`` as one of this transformer's attention modules (self-attention ones are numbered in the
        order they are added)."""
        key = graph.site_key() if self_attention else None
        site = Site(weakref.ref(self), name, self._self_attention_count if self_attention else None, key)
        self._self_attention_count += self_attention
        module.__dict__[SITE_ATTR] = graph.register_site(site)
        return site

    def adopt(self, processor: Any, applied: bool, originals: dict[str, Any] | None = None) -> None:
        """Record the processor that serves the self-attention modules (and what it replaced)."""
        self.processor, self.applied, self.originals = processor, applied, dict(originals or {})
        self._sparse_modules = [
            (n, m)
            for n, m in self.adapter.self_attention_modules(self.model)
            if getattr(m, "processor", None) is processor  # modules routed by hooks hold no processor
        ]

    def detach(self) -> None:
        """Remove the hook and the sites; the model's forward is its own again."""
        model = self.model_ref()
        self.active = False
        if model is None:
            return
        registry = getattr(model, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is self.hook:
            registry.remove_hook(HOOK_NAME, recurse=False)
        for module in model.modules():
            site = module.__dict__.get(SITE_ATTR)
            if site is not None and site.tracker_ref() in (self, None):
                del module.__dict__[SITE_ATTR]

    # -------------------------------------------------------------- per forward
    def begin(self, args: tuple, kwargs: dict[str, Any], context: Any = None) -> Frame | None:
        """Read layout, timestep (one host sync) and cache context of a forward; publish its frame.

        None when the processors were all replaced the Diffusers way (``set_attn_processor(...)`` of other
        processors): dit_sparse then lets go of the transformer.
        """
        if not self._check_processors():
            return None
        model = self.model
        inputs = self.adapter.bind(model, args, kwargs)
        layout = self.adapter.layout(model, inputs)
        t = self.adapter.timestep(inputs)
        timestep = None if t is None else float(t.detach().float().max())
        if context is None and self.hook is not None:
            context = self.hook.state_manager._context
        state, stats = self.state, self.stats
        before = state.generation
        state.begin(timestep, layout, getattr(context, "name", None), getattr(context, "step_index", None))
        if state.generation != before:
            stats.generations += 1
            state.num_steps = schedule_steps(self.pipe_ref()) if self.pipe_ref is not None else None
        if state.pass_index == 0:
            stats.steps += 1
        if state.cfg_pass not in stats.passes:
            stats.passes.append(state.cfg_pass)
        stats.num_steps = state.num_steps
        stats.dense_steps = self.processor.method.config.warmup_steps(state.num_steps) if self.processor else 0
        start = Timer.start(self.adapter.device(inputs))
        self.frame = Frame(self, layout, state.step, timestep, state.cfg_pass, state.num_steps, start)
        self.active = True
        return self.frame

    def end(self) -> None:
        """The forward returned: time it; the frame stays for gradient checkpointing's re-run in backward."""
        if self.active and self.frame is not None and self.frame.start is not None:
            self.stats.forward_timer.stop(self.frame.start)
        self.active = False

    def _check_processors(self) -> bool:
        """The self-attention modules still hold the processor. Fused projections (CogVideoX
        ``fuse_qkv_projections()`` installs fused processors) are wrapped again, so the method survives fusion;
        any other replacement is an error after :func:`dit_sparse.apply`, and the Diffusers way's way out when every
        processor was replaced."""
        processor = self.processor
        if processor is None:
            return True
        replaced = []
        for name, module in self._sparse_modules:
            current = module.processor
            if current is processor:
                continue
            if getattr(module, "fused_projections", False) and not _is_sparse(current):
                processor.bind(module, current)
                self.adapter.set_processor(module, processor)
                continue
            replaced.append(name)
        if not replaced:
            return True
        if not self.applied and len(replaced) == len(self._sparse_modules):
            self.detach()
            return False
        raise RuntimeError(
            f"dit_sparse: the attention processors of {', '.join(replaced[:3])}"
            f"{' ...' if len(replaced) > 3 else ''} were replaced after dit_sparse was applied, so their attention "
            "would silently run dense; call dit_sparse.remove(...) before setting other processors (and apply again "
            "after)"
        )


def _is_sparse(processor: Any) -> bool:
    from dit_sparse.processor import SparseProcessor

    return isinstance(processor, SparseProcessor)


def warmup_from_fraction(at_50: int, num_steps: int | None) -> int:
    """A warm-up given as steps of a 50-step schedule, on a schedule of ``num_steps`` (rounded half up)."""
    if num_steps is None or num_steps == 50:
        return at_50
    return int(math.floor(at_50 * num_steps / 50 + 0.5))


@functools.cache
def _hook_cls() -> type:
    """The Diffusers ``ModelHook`` subclass (built on first use: diffusers is imported lazily)."""
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class TrackerHook(ModelHook):
        """Stateful Diffusers hook owning a :class:`Tracker`: publishes each forward's frame, holds the pipeline's
        cache context, and resets the generation after a pipeline call.

        ``torch.compile(transformer)`` traces the hook: the tracker's ``begin`` and ``end`` then run at run time as
        custom ops of the graph (:mod:`dit_sparse.graph`), so each forward still publishes its own step and nothing
        breaks the graph.
        """

        _is_stateful = True

        def __init__(self, tracker: Tracker) -> None:
            super().__init__()
            self.tracker = tracker
            self.state_manager = StateManager(BaseState)  # Diffusers' cache_context(...) sets its context

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
            if torch.compiler.is_compiling():
                graph.begin_forward(self.tracker, args, kwargs)
            else:
                self.tracker.token = None
                self.tracker.begin(args, kwargs)
            return args, kwargs

        def post_forward(self, module: nn.Module, output: Any) -> Any:
            if torch.compiler.is_compiling():
                graph.end_forward(self.tracker, output)
            else:
                self.tracker.end()
            return output

        def reset_state(self, module: nn.Module) -> nn.Module:
            self.state_manager.reset()
            self.tracker.state.reset()
            return module

    return TrackerHook
