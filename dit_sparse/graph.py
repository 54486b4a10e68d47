"""dit_sparse inside a ``torch.compile`` graph: custom ops, so that no part of it is a graph break.

Dynamo cannot trace what dit_sparse does per call (the method's Python, the per-step state, the statistics, the
kernel's launch), and it must not: a value read while tracing would be frozen into the graph or guarded, so that
every step recompiled. Instead the compiled graph calls two ``torch.library`` custom ops, opaque to the compiler,
whose fake (meta) implementations give the output shapes; their real implementations run the same eager code as an
uncompiled forward, at run time, every call:

- ``dit_sparse::attend`` stands in for a self-attention module's ``scaled_dot_product_attention`` call and runs
  :meth:`SparseProcessor.attention` (dense warm-up steps, dense layers, static and dynamic methods, the kernel).
  The module is named by its site's key, a 0-d int64 CPU tensor on the module: an input of the graph, not a
  constant, so one graph serves every transformer block (regional compilation compiles the block class once).
- ``dit_sparse::begin_forward`` / ``dit_sparse::end_forward``: the tracker's per-forward bookkeeping (step, CFG pass,
  layout, timing) when the whole transformer is compiled (its Diffusers hook is traced then). ``begin_forward``
  returns a token that every ``attend`` of that forward takes as an input, so the compiler cannot move an attention
  call before its forward began.

Consequences: ``torch.compile(transformer, fullgraph=True)`` and ``compile_repeated_blocks(fullgraph=True)`` trace
without breaks for every method; the step, the dense/sparse switch and a method's per-step state never recompile
(they are not seen by Dynamo). CUDA graphs (``mode="reduce-overhead"``) replay kernels without running Python, so
a captured op would freeze one step's routing: the ops are tagged ``cudagraph_unsafe``, and with Inductor's graph
partitioning (``torch._inductor.config.graph_partition = True``) the code between them is captured and replayed while
they run eagerly at every call, for every method, dynamic ones included (``benchmarks/cudagraphs.py``). Training under compile keeps the eager graph break (the ops have no
autograd formula): :func:`traceable` says when the op path is taken.
"""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

ENABLED = os.environ.get("DIT_SPARSE_GRAPH_OPS", "1") != "0"
"""Trace self-attention through the ops (default). ``DIT_SPARSE_GRAPH_OPS=0`` (or setting this False before
compiling) traces the older way, a graph break per self-attention call, for comparisons (``benchmarks``)."""

_KEYS = itertools.count(1)
_SITES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_TRACKERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_SPECS: dict[tuple, int] = {}
_SPEC_OF: dict[int, tuple] = {}


def site_key() -> torch.Tensor:
    """A new key (0-d int64 CPU tensor) for a self-attention site (:func:`register_site` it once made)."""
    return torch.tensor(next(_KEYS), dtype=torch.int64)


def register_site(site: Any) -> Any:
    """Name ``site`` (a :class:`~dit_sparse.state.Site` with a key) to :func:`attend`; returns it."""
    if site.key is not None:
        _SITES[int(site.key)] = site
    return site


def tracker_key(tracker: Any) -> int:
    """A new key naming ``tracker`` to :func:`begin_forward` (a constant of its transformer's graph)."""
    key = next(_KEYS)
    _TRACKERS[key] = tracker
    return key


def traceable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a self-attention call being traced goes through :func:`attend` (no autograd through it: not when
    gradients are wanted)."""
    return ENABLED and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _found(registry: weakref.WeakValueDictionary, key: int, what: str) -> Any:
    found = registry.get(key)
    if found is None:
        raise RuntimeError(
            f"dit_sparse: a compiled graph names a {what} that dit_sparse no longer tracks (dit_sparse.remove(...) or "
            "apply(...) again after torch.compile): call torch._dynamo.reset() or compile again after applying"
        )
    return found


# ----------------------------------------------------------------------------------------------- attention
_EAGER = (torch.Tag.cudagraph_unsafe,)
"""The ops' Python must run at every call (routing, per-step state): under ``mode="reduce-overhead"`` inductor's graph
partitioning (``torch._inductor.config.graph_partition``) CUDA-graphs the code between them and runs them eagerly."""


@torch.library.custom_op("dit_sparse::attend", mutates_args=(), tags=_EAGER)
def _attend_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    site: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    token: torch.Tensor | None,
) -> torch.Tensor:
    from dit_sparse.processor import route_call

    found = _found(_SITES, int(site), "self-attention module")
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out = route_call(found, F.scaled_dot_product_attention, (query, key, value), kwargs)
    like = _attend_out(query, value)
    if out.stride() != like.stride():  # the fake's strides are what the compiled graph assumes
        out = like.copy_(out)
    return out


@_attend_op.register_fake
def _(query, key, value, site, attn_mask, dropout_p, is_causal, scale, enable_gqa, token):
    return _attend_out(query, value)


def _attend_out(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The output of an attention call in the memory layout of ``query`` (BNHD as Diffusers passes it)."""
    if value.shape[-1] == query.shape[-1]:
        return torch.empty_like(query)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def attend(site: Any, args: tuple, kwargs: dict[str, Any], token: torch.Tensor | None) -> torch.Tensor:
    """The traced form of one self-attention SDPA call of the module at ``site`` (its arguments as SDPA takes them)."""
    from dit_sparse.processor import _sdpa_args

    q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_args(*args, **kwargs)
    return _attend_op(q, k, v, site.key, mask, float(dropout_p), bool(is_causal), scale, bool(enable_gqa), token)


# ----------------------------------------------------------------------------------------------- forwards
@torch.library.custom_op("dit_sparse::begin_forward", mutates_args=(), tags=_EAGER)
def _begin_op(tensors: list[torch.Tensor], tracker: int, spec: int, device: torch.device) -> torch.Tensor:
    found = _found(_TRACKERS, tracker, "transformer")
    args, kwargs = _rebuild(_SPEC_OF[spec], tensors)
    found.begin(args, kwargs)
    return torch.empty(0, device=device)


@_begin_op.register_fake
def _(tensors, tracker, spec, device):
    return torch.empty(0, device=device)


@torch.library.custom_op("dit_sparse::end_forward", mutates_args=(), tags=_EAGER)
def _end_op(output: torch.Tensor, tracker: int) -> torch.Tensor:
    _found(_TRACKERS, tracker, "transformer").end()
    return torch.empty(0, device=output.device)


@_end_op.register_fake
def _(output, tracker):
    return torch.empty(0, device=output.device)


def begin_forward(tracker: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    """Traced form of the tracker's ``begin``: its inputs' tensors go to the op, the rest (ints, bools, None, ...)
    into a spec kept here; the token lands on ``tracker.token`` for the forward's attention calls."""
    tensors: list[torch.Tensor] = []
    spec = (_spec_items(args, tensors), tuple(sorted(_spec_items(kwargs, tensors, named=True))))
    device = next((t.device for t in tensors if t.is_floating_point()), tensors[0].device if tensors else "cpu")
    tracker.token = _begin_op(tensors, tracker.key, _spec_key(spec), device)


def end_forward(tracker: Any, output: Any) -> None:
    """Traced form of the tracker's ``end``, after the forward's ``output`` (its first tensor) was computed."""
    first = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
    if isinstance(first, torch.Tensor):
        tracker.token = _end_op(first.detach(), tracker.key)


def _spec_items(values: Any, tensors: list[torch.Tensor], named: bool = False) -> tuple:
    """(name or position, ("tensor", i) | ("value", v)) of the top-level inputs; values that are not plain constants
    (dicts, objects) are left out: no adapter reads them."""
    items = values.items() if named else enumerate(values)
    out = []
    for name, value in items:
        if isinstance(value, torch.Tensor):
            out.append((name, ("tensor", len(tensors))))
            tensors.append(value.detach())  # bookkeeping only: no gradient flows through the op
        elif value is None or isinstance(value, (bool, int, float, str)):
            out.append((name, ("value", value)))
        elif not named:
            out.append((name, ("value", None)))  # keeps the positions of the arguments after it
    return tuple(out)


@torch.compiler.assume_constant_result
def _spec_key(spec: tuple) -> int:
    key = _SPECS.get(spec)
    if key is None:
        key = _SPECS[spec] = len(_SPECS)
        _SPEC_OF[key] = spec
    return key


def _rebuild(spec: tuple, tensors: list[torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
    positional, named = spec
    take = lambda item: tensors[item[1]] if item[0] == "tensor" else item[1]  # noqa: E731
    args = tuple(take(item) for _, item in positional)
    return args, {name: take(item) for name, item in named}
