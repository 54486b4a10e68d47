"""Per-step state: where in the denoising loop and in the model an attention call is.

``StepContext`` is what a method sees for one call. The rest is the machinery that fills it: a ``Tracker`` per
transformer (hooks that publish each forward's ``TokenLayout``, step and CFG pass as a ``Frame``), the
``GenerationState`` it keeps, the statistics ``dit_sparse.report`` reads, and ``GlobalHooks`` for transformers that
were handed a ``SparseProcessor`` the Diffusers way (``set_attn_processor``) instead of ``dit_sparse.apply``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dit_sparse.layout import TokenLayout


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
    """

    step: int
    timestep: float | None
    cfg_pass: str
    layer: str
    layer_index: int
    layout: TokenLayout
    cache: dict[str, Any] = field(default_factory=dict)
    transformer: str = "transformer"

    @property
    def layer_key(self) -> tuple[str, int]:
        """``(transformer, layer_index)``: what identifies a layer across a pipeline's transformers."""
        return (self.transformer, self.layer_index)


# --------------------------------------------------------------------------------------------------------------
# Per-transformer generation state, statistics, and the hooks that publish the layout and step to the processors
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationState:
    """Where one transformer is in the current generation; fed once per transformer forward.

    A new generation starts (the cache is cleared) after :meth:`reset` (Diffusers resets stateful hooks after a
    pipeline call), when the input shapes change, when the timestep jumps back up, or when the pipeline's step index
    goes back. The step advances when the timestep (or the pipeline's step index) changes; further calls at the same
    step are further CFG passes, named by the pipeline's cache context (``"cond"``, ``"uncond"``, ``"cond_uncond"``)
    or ``"pass<i>"`` (the i-th call of the step) when the pipeline names none. Calling a transformer directly again
    with the same timestep therefore counts as another CFG pass of the same step; to mark steps yourself (e.g. in a
    benchmark loop) wrap the call in ``transformer.cache_context("cond", step_index=i)``.
    """

    generation: int = 0
    step: int = -1
    timestep: float | None = None
    cfg_pass: str = ""
    pass_index: int = 0
    shape_key: Any = None
    passes: list[str] = field(default_factory=list)
    steps_seen: int = 0
    cache: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    fresh: bool = True

    def reset(self) -> None:
        """End the current generation: the next call starts a new one with an empty cache."""
        self.fresh = True
        self.cache.clear()

    def begin(
        self, timestep: float | None, shape_key: Any, context_name: str | None = None, step_index: int | None = None
    ) -> None:
        """Account for one transformer forward."""
        new = self.fresh or shape_key != self.shape_key
        if not new and step_index is not None and self.step >= 0 and step_index < self.step:
            new = True
        if not new and timestep is not None and self.timestep is not None and timestep > self.timestep:
            new = True
        if new:
            self.generation += 1
            self.step, self.timestep, self.pass_index, self.steps_seen = -1, None, 0, 0
            self.passes = []
            self.cache.clear()
            self.fresh = False
            self.shape_key = shape_key
        if step_index is not None:
            new_step = step_index != self.step
            step = step_index
        else:
            new_step = self.step < 0 or timestep is None or timestep != self.timestep
            step = self.step + 1 if new_step else self.step
        if new_step:
            self.steps_seen += 1
        self.pass_index = 0 if new_step else self.pass_index + 1
        self.step, self.timestep = step, timestep
        self.cfg_pass = context_name or f"pass{self.pass_index}"
        if self.cfg_pass not in self.passes:
            self.passes.append(self.cfg_pass)

    def layer_cache(self, layer: str, cfg_pass: str) -> dict[str, Any]:
        """The cache of one (layer, CFG pass) in this generation."""
        return self.cache.setdefault((layer, cfg_pass), {})


class Timer:
    """Durations in ms: CUDA events read lazily on GPU (no sync when recorded), wall clock on CPU."""

    def __init__(self) -> None:
        self._done: list[float] = []
        self._events: list[tuple[Any, Any]] = []

    @staticmethod
    def start(device: torch.device) -> Any:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start: Any) -> None:
        if isinstance(start, float):
            self._done.append((time.perf_counter() - start) * 1e3)
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((start, end))

    def values(self) -> list[float]:
        """Every duration recorded so far, in order of completion for CPU and CUDA separately."""
        if self._events:
            self._events[-1][1].synchronize()
            self._done.extend(s.elapsed_time(e) for s, e in self._events)
            self._events.clear()
        return list(self._done)

    def total(self) -> float:
        return float(sum(self.values()))


@dataclass
class LayerStats:
    """Counters of one self-attention module (density and errors stay tensors until read)."""

    calls: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    density_sum: Any = 0.0  # sum over sparse calls of density × tokens (tensor on the device)
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

    def layer(self, name: str) -> LayerStats:
        stats = self.layers.get(name)
        if stats is None:
            stats = self.layers[name] = LayerStats()
        return stats


@dataclass
class Frame:
    """What one transformer forward publishes to the processors: layout, step, CFG pass, its tracker."""

    tracker: Tracker
    layout: TokenLayout
    step: int
    timestep: float | None
    cfg_pass: str
    start: Any = None
    _layouts: dict[tuple[int, int], TokenLayout | None] = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        return self.tracker.model

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


@dataclass
class _Pending:
    """A supported transformer's forward seen by the global hook before dit_sparse tracked it."""

    model: nn.Module
    args: tuple
    kwargs: dict[str, Any] | None

    @property
    def module(self) -> nn.Module:
        return self.model


class _Local(threading.local):
    stack: list[Frame | _Pending]

    def __init__(self) -> None:
        self.stack = []


_LOCAL = _Local()  # the transformer forwards running in this thread, innermost last
_TRACKERS: weakref.WeakKeyDictionary[nn.Module, Tracker] = weakref.WeakKeyDictionary()
HOOK_NAME = "dit_sparse"


def current_frame() -> Frame | _Pending | None:
    """The innermost transformer forward running now (None outside any)."""
    stack = _LOCAL.stack
    return stack[-1] if stack else None


def _pop(model: nn.Module) -> Frame | _Pending | None:
    stack = _LOCAL.stack
    for i in range(len(stack) - 1, -1, -1):
        if stack[i].module is model:
            return stack.pop(i)
    return None


def get_tracker(model: nn.Module) -> Tracker | None:
    return _TRACKERS.get(model)


class Tracker:
    """Per-transformer state: the hooks that publish each forward's layout and step, the generation state, stats.

    Installed by :func:`Tracker.attach`: a stateful Diffusers ``ModelHook`` (receives the pipeline's cache context
    and ``reset_state`` after a pipeline call) plus a torch forward pre-hook / forward hook pair.
    """

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        self.model_ref = weakref.ref(model)
        self.adapter = adapter
        self.state = GenerationState()
        self.stats = TransformerStats()
        self.names: dict[nn.Module, tuple[str, int | None]] = {}
        index = 0
        for name, module in adapter.attention_modules(model):
            if adapter.is_self_attention(name):
                self.names[module] = (name, index)
                index += 1
            else:
                self.names[module] = (name, None)
        self._handles: list[Any] = []
        self._ctx_hook: Any = None

    @property
    def model(self) -> nn.Module:
        model = self.model_ref()
        if model is None:
            raise RuntimeError("the transformer tracked by dit_sparse no longer exists")
        return model

    # -------------------------------------------------------------- install
    @classmethod
    def attach(cls, model: nn.Module, adapter: Any) -> Tracker:
        """The model's tracker, installing it on first use."""
        tracker = _TRACKERS.get(model)
        if tracker is not None:
            return tracker
        from diffusers.hooks import HookRegistry

        tracker = cls(model, adapter)
        tracker._ctx_hook = _context_hook_cls()(tracker)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        if registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
        registry.register_hook(tracker._ctx_hook, HOOK_NAME)
        tracker._handles = [
            model.register_forward_pre_hook(tracker._pre, with_kwargs=True),
            model.register_forward_hook(tracker._post, always_call=True),
        ]
        _TRACKERS[model] = tracker
        return tracker

    def detach(self) -> None:
        """Remove the hooks; the model's forward is its own again."""
        model = self.model_ref()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if model is not None:
            registry = getattr(model, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(HOOK_NAME) is not None:
                registry.remove_hook(HOOK_NAME, recurse=False)
            _TRACKERS.pop(model, None)
            _pop(model)

    # -------------------------------------------------------------- per forward
    # torch.compile(transformer) traces the module's hooks: these run eagerly (a graph break at the start and the end
    # of the forward), so each forward publishes its own step instead of one baked into the graph.
    @torch.compiler.disable
    def _pre(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.begin(args, kwargs)

    @torch.compiler.disable
    def _post(self, model: nn.Module, args: tuple, output: Any) -> None:
        frame = _pop(model)
        if isinstance(frame, Frame) and frame.start is not None:
            self.stats.forward_timer.stop(frame.start)

    def begin(self, args: tuple, kwargs: dict[str, Any], context: Any = None) -> Frame:
        """Read layout, timestep (one host sync) and cache context of a forward; push its frame."""
        model = self.model
        _pop(model)  # a forward that raised never popped its frame
        inputs = self.adapter.bind(model, args, kwargs)
        layout = self.adapter.layout(model, inputs)
        t = self.adapter.timestep(inputs)
        timestep = None if t is None else float(t.detach().float().max())
        if context is None and self._ctx_hook is not None:
            context = self._ctx_hook.state_manager._context
        name = getattr(context, "name", None)
        step_index = getattr(context, "step_index", None)
        state = self.state
        before = state.generation
        state.begin(timestep, layout, name, step_index)
        stats = self.stats
        if state.generation != before:
            stats.generations += 1
        if state.pass_index == 0:
            stats.steps += 1
        if state.cfg_pass not in stats.passes:
            stats.passes.append(state.cfg_pass)
        device = inputs["hidden_states"].device
        frame = Frame(self, layout, state.step, timestep, state.cfg_pass, start=Timer.start(device))
        _LOCAL.stack.append(frame)
        return frame

    def layer_info(self, module: nn.Module) -> tuple[str, int | None]:
        """(name, self-attention index or None) of an attention module of this transformer."""
        info = self.names.get(module)
        if info is None:
            for name, mod in self.model.named_modules():
                if mod is module:
                    idx = None
                    if self.adapter.is_self_attention(name):
                        idx = sum(1 for i in self.names.values() if i[1] is not None)
                    info = self.names[module] = (name, idx)
                    break
            else:
                info = self.names[module] = (type(module).__name__, None)
        return info


@functools.cache
def _context_hook_cls() -> type:
    """The Diffusers ``ModelHook`` subclass (built on first use: diffusers is imported lazily)."""
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class ContextHook(ModelHook):
        """Stateful Diffusers hook: holds the pipeline's cache context; resets the generation after a pipeline call."""

        _is_stateful = True

        def __init__(self, tracker: Tracker) -> None:
            super().__init__()
            self.tracker_ref = weakref.ref(tracker)
            self.state_manager = StateManager(BaseState)  # Diffusers' cache_context(...) sets its context

        def reset_state(self, module: nn.Module) -> nn.Module:
            self.state_manager.reset()
            tracker = self.tracker_ref()
            if tracker is not None:
                tracker.state.reset()
            return module

    return ContextHook


# ------------------------------------------------------------------ the Diffusers way: global first-sighting hooks
class GlobalHooks:
    """While any SparseProcessor is alive, a global module hook notes forwards of supported, untracked transformers
    (``set_attn_processor(SparseProcessor())`` never hands dit_sparse the transformer); the processor attaches the
    tracker on its first call inside such a forward.

    When the last processor dies the hooks turn inert; :meth:`sweep` (``dit_sparse.remove``) removes them. Not the
    processor's finalizer: the garbage collector may free a processor in the middle of a ``torch.compile``, whose
    guards read the global hook dicts (removing a hook then breaks that compilation). Inert hooks cost an attribute
    check per module call in eager mode and nothing in compiled code.
    """

    _users = 0
    _handles: list[Any] = []
    _adapters: dict[type, Any] = {}

    @classmethod
    def acquire(cls) -> None:
        cls._users += 1
        if not cls._handles:
            from torch.nn.modules import module as torch_module

            cls._handles = [
                torch_module.register_module_forward_pre_hook(cls._pre),
                torch_module.register_module_forward_hook(cls._post, always_call=True),
            ]

    @classmethod
    def release(cls) -> None:
        cls._users -= 1

    @classmethod
    def sweep(cls) -> None:
        """Remove the hooks if no SparseProcessor is alive (call only outside any forward)."""
        if cls._users == 0 and cls._handles:
            for handle in cls._handles:
                handle.remove()
            cls._handles = []

    @classmethod
    def _adapter(cls, module: nn.Module) -> Any:
        kind = type(module)
        if kind not in cls._adapters:
            from dit_sparse.pipelines import find_adapter

            cls._adapters[kind] = find_adapter(module)
        return cls._adapters[kind]

    @classmethod
    def _pre(cls, module: nn.Module, args: tuple) -> None:
        # traced code (a compiled block or transformer): nothing to note; a compiled transformer is tracked only once
        # dit_sparse.apply or an eager forward attached its tracker (see SparseProcessor)
        if torch.compiler.is_compiling() or cls._users <= 0 or module in _TRACKERS or cls._adapter(module) is None:
            return
        # global pre-hooks get no kwargs: read them from torch's Module._call_impl frame (pipelines pass kwargs)
        kwargs = _call_kwargs()
        _pop(module)
        _LOCAL.stack.append(_Pending(module, args, dict(kwargs) if isinstance(kwargs, dict) else None))

    @classmethod
    def _post(cls, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        stack = _LOCAL.stack
        if stack and isinstance(stack[-1], _Pending) and stack[-1].model is module:
            stack.pop()


def _call_kwargs() -> dict[str, Any] | None:
    """The keyword arguments of the ``Module.__call__`` running the current global hook (torch calls global pre-hooks
    with positional arguments only)."""
    from torch.nn.modules import module as torch_module

    frame = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            break
        if frame.f_code.co_filename == torch_module.__file__ and frame.f_code.co_name in ("_call_impl", "inner"):
            kwargs = frame.f_locals.get("kwargs")
            if isinstance(kwargs, dict):
                return kwargs
        frame = frame.f_back
    return None


def resolve_frame(entry: Frame | _Pending) -> Frame:
    """Turn a pending forward (seen by the global hook) into a tracked one: attach the tracker, publish the frame."""
    if isinstance(entry, Frame):
        return entry
    if entry.kwargs is None:
        raise RuntimeError(
            f"dit_sparse could not read the inputs of this {type(entry.model).__name__} forward; "
            "use dit_sparse.apply(pipe_or_transformer, ...) instead of set_attn_processor"
        )
    adapter = GlobalHooks._adapter(entry.model)
    tracker = Tracker.attach(entry.model, adapter)
    _pop(entry.model)
    return tracker.begin(entry.args, entry.kwargs)
