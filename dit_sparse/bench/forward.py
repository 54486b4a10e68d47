"""Timing one transformer forward: steps named the pipeline's way, CUDA-event timers, the self-attention share of a
dense forward, and compiling a model the way users do."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dit_sparse.bench.models import ModelSpec
from dit_sparse.timing import Timer


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
    """Seconds of one untimed forward (a compiled model's first one includes compilation)."""
    timer = Timer()
    with torch.inference_mode(), _step(model, steps):
        start = Timer.start(_device_of(inputs))
        call(**inputs)
        timer.stop(start)
    return timer.total() / 1e3


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
