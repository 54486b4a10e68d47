"""Any transformer through a declared token layout: ``dit_sparse.apply(model, method, layout=...)``.

For a model without a family adapter, Diffusers or not, whose self-attention calls
``torch.nn.functional.scaled_dot_product_attention`` (q, k, v in ``[B, H, N, D]``). The user declares the
:class:`~dit_sparse.layout.TokenLayout` of its self-attention calls, as one TokenLayout or as a function of the
forward's inputs by name (``{"hidden_states": ..., "timestep": ..., **forward kwargs}``) returning one.

The self-attention modules are those whose name matches ``attention`` (a regex, ``fullmatch``) or, by default, the
modules found during the first forward: the innermost running module of every SDPA call whose queries and keys both
number ``layout.seq_len`` (a module that has such a child is therefore not one). That first forward already runs
sparse; from the second on, forward pre/post hooks on each module route its SDPA calls
(:class:`~dit_sparse.processor.ModuleRouter`) through the same processor, tracker and per-step state as a family
adapter. Layers are numbered in the order of their first call (the ``attention`` regex: in module order). The
denoising step comes from a ``timestep`` (or ``timesteps``) argument of the forward; without one every forward is a
new step. Eager only (``torch.compile`` is not covered). ``dit_sparse.remove`` takes every hook off.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dit_sparse.layout import TokenLayout, VoxelLayout
from dit_sparse.state import SITE_ATTR

from .base import ModelAdapter

LayoutSpec = TokenLayout | Callable[[dict[str, Any]], TokenLayout]
"""What ``apply(..., layout=)`` takes: a TokenLayout, or a function of the forward's inputs by name returning one."""

_DECLARE = (
    "declare it with dit_sparse.apply(model, method, layout=TokenLayout(frames, height, width, text_len=..., "
    "text_where=...)) or layout=<function of the forward's inputs by name returning one>"
)


class DeclaredAdapter(ModelAdapter):
    """The adapter of one model given a declared layout (made per ``apply`` call and model; it holds the hooks).

    Args:
        model: the transformer.
        layout: a TokenLayout or a function ``inputs -> TokenLayout`` (:data:`LayoutSpec`).
        attention: optional regex (``fullmatch`` on module names) naming the self-attention modules; default: found
            during the first forward (the modules whose SDPA calls attend ``layout.seq_len`` queries and keys).
    """

    family = "declared"
    layout_help = (
        "declare the layout of these calls (frames * height * width + text_len == the tokens attended) with "
        "apply(..., layout=...), or name the self-attention modules with apply(..., attention=regex)"
    )

    def __init__(self, model: nn.Module, layout: LayoutSpec, attention: str | None = None) -> None:
        super().__init__()
        if not isinstance(layout, (TokenLayout, VoxelLayout)) and not callable(layout):
            raise TypeError(
                f"dit_sparse: layout= takes a TokenLayout or a function returning one (a VoxelLayout for sparse voxels), got {layout!r}"
            )
        self._declared = layout
        self._modules: list[tuple[str, nn.Module]] = []
        self._routers: list[Any] = []
        self._discovery: _Discovery | None = None
        if attention is not None:
            self._modules = _matching_modules(model, attention)

    # ------------------------------------------------------------------ inputs
    def bind(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward's inputs by name (``**kwargs`` of the forward merged in, ``self`` left out)."""
        inputs = dict(super().bind(model, args, kwargs))
        params = list(self._signatures[type(model)].parameters.values())
        inputs.pop(params[0].name, None)
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                inputs.update(inputs.pop(p.name, {}))
        return inputs

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        layout = self._declared if isinstance(self._declared, (TokenLayout, VoxelLayout)) else self._declared(inputs)
        if not isinstance(layout, (TokenLayout, VoxelLayout)):
            raise TypeError(
                f"dit_sparse: no token layout for this forward of {type(model).__name__}: the layout function returned "
                f"{layout!r}; it must return a TokenLayout of the self-attention tokens ({_DECLARE})"
            )
        return layout

    def timestep(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The forward's ``timestep`` (or ``timesteps``) argument; None (each forward a new step) without one."""
        key = "timestep" if "timestep" in inputs else "timesteps"
        return super().timestep({"timestep": inputs.get(key)})

    def device(self, inputs: dict[str, Any]) -> torch.device:
        """The device of the forward's first tensor input (the CPU without one)."""
        return next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))

    # ------------------------------------------------------------------ modules
    def is_self_attention(self, name: str) -> bool:
        return True

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The self-attention modules (named by ``attention=``, or found so far)."""
        return list(self._modules)

    def check_modules(self, model: nn.Module) -> None:
        """Nothing to check before the first forward (``attention=`` was checked when the adapter was made)."""

    def install(self, model: nn.Module, processor: Any, tracker: Any) -> dict[str, Any]:
        """Route the named modules now, or find them during the first forward; no processor is replaced."""
        if self._modules:
            self._route(processor)
        else:
            self._discovery = _Discovery(self, model, processor, tracker)
        return {}

    def release(self, model: nn.Module) -> None:
        """Take every hook off (the model is exactly what it was)."""
        for router in self._routers:
            router.remove()
        self._routers = []
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery = None

    def _route(self, processor: Any) -> None:
        from dit_sparse.processor import ModuleRouter

        self._routers = [ModuleRouter(processor, module) for _, module in self._modules]

    def _found(self, modules: list[tuple[str, nn.Module]], processor: Any) -> None:
        """The first forward found the self-attention modules: route them by hooks from now on."""
        self._discovery = None
        self._modules = modules
        self._route(processor)


def _matching_modules(model: nn.Module, attention: str) -> list[tuple[str, nn.Module]]:
    """Modules whose name fully matches ``attention``, without those that contain another match."""
    try:
        pattern = re.compile(attention)
    except re.error as e:
        raise ValueError(f"dit_sparse: attention={attention!r} is not a valid regex ({e})") from None
    named = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    inner = [(n, m) for n, m in named if not any(other.startswith(n + ".") for other, _ in named)]
    if not inner:
        examples = ", ".join(n for n, _ in list(model.named_modules())[1:6])
        raise ValueError(
            f"dit_sparse: attention={attention!r} matches no module name of this {type(model).__name__} (names look "
            f"like: {examples}); give a regex that fully matches the self-attention modules' names"
        )
    return inner


class _Discovery(TorchFunctionMode):
    """The first forward (until one succeeds): finds the self-attention modules and routes their SDPA calls.

    Forward hooks on every submodule keep the stack of running modules; the mode, active for the whole forward,
    attributes each SDPA call over ``layout.seq_len`` queries and keys to the innermost running module, gives that
    module its site (layer name and index) and routes the call. Other SDPA calls pass through (their sizes are kept
    for the error when nothing matched).
    """

    def __init__(self, adapter: DeclaredAdapter, model: nn.Module, processor: Any, tracker: Any) -> None:
        super().__init__()
        self.adapter, self.processor, self.tracker = adapter, processor, tracker
        self._names = {id(m): n for n, m in model.named_modules() if n}
        self._stack: list[nn.Module] = []
        self._found: list[tuple[str, nn.Module]] = []  # kept when a forward raises: their sites stay numbered
        self._other: set[tuple[int, int]] = set()
        self._handles = [
            model.register_forward_pre_hook(self._begin),
            model.register_forward_hook(self._end, always_call=True),
        ]
        for module in model.modules():
            if module is not model:
                self._handles.append(module.register_forward_pre_hook(self._push))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _push(self, module: nn.Module, args: tuple) -> None:
        self._stack.append(module)

    def _pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def _begin(self, model: nn.Module, args: tuple) -> None:
        self._stack, self._other = [], set()
        self.__enter__()

    def _end(self, model: nn.Module, args: tuple, output: Any) -> None:
        self.__exit__(None, None, None)
        if sys.exc_info()[1] is not None:  # the forward raised: go on looking at the next one
            return
        if not self._found:
            layout = self.tracker.frame.layout if self.tracker.frame is not None else None
            seen = ", ".join(f"{q}x{k}" for q, k in sorted(self._other)) or "none"
            raise RuntimeError(
                f"dit_sparse: found no self-attention module in this {type(model).__name__}: no module's "
                "torch.nn.functional.scaled_dot_product_attention call attended the declared layout's "
                f"{getattr(layout, 'seq_len', '?')} tokens (layout {layout}); SDPA calls seen (queries x keys): "
                f"{seen}. Declare the layout of the self-attention tokens, or name its modules with "
                "apply(..., attention=regex)"
            )
        self.remove()
        self.adapter._found(self._found, self.processor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        from dit_sparse.processor import _Route, _sdpa_args

        q, k = _sdpa_args(*args, **kwargs)[:2]
        frame = self.tracker.frame
        n = frame.layout.seq_len if frame is not None and self.tracker.active else None
        if not self._stack or q.dim() != 4 or k.dim() != 4 or not (q.shape[-2] == k.shape[-2] == n):
            self._other.add((q.shape[-2], k.shape[-2]))
            return func(*args, **kwargs)
        module = self._stack[-1]
        site = module.__dict__.get(SITE_ATTR)
        if site is None:
            site = self.tracker.add_site(self._names[id(module)], module)
        if not any(m is module for _, m in self._found):
            self._found.append((site.name, module))
        return self.processor.attention(_Route(frame, site.name, site.index), func, args, kwargs)
