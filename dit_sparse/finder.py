"""The Diffusers way's first sighting: find the transformer of a ``SparseProcessor`` set with ``set_attn_processor``.

``transformer.set_attn_processor(SparseProcessor(...))`` never hands dit_sparse the transformer, and the layout of
a forward comes from the transformer's inputs, which exist only in its forward call. So a new SparseProcessor waits:
while any processor waits, two process-wide module pre-hooks and one post-hook are installed; the first forward of a
supported transformer whose self-attention holds a waiting processor attaches a :class:`~dit_sparse.state.Tracker`
(the transformer's own hook from then on) and publishes that forward's frame; the processor stops waiting, and once
none waits the hooks remove themselves. ``dit_sparse.apply`` never installs them.

Torch gives global pre-hooks no keyword arguments (pipelines call transformers with keywords only). The first hook
(``_sight``) therefore marks a sighted transformer so that torch hands the second (``_read``) the call's keywords:
torch passes them to any pre-hook whose id is in the module's ``_forward_pre_hooks_with_kwargs``. Should a torch
release stop doing so, ``_read`` gets none and the processor's first call says to use ``dit_sparse.apply``.
Hooks are skipped in traced code: ``torch.compile`` of a whole transformer set the Diffusers way needs one eager
forward (or ``dit_sparse.apply``) first.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from dit_sparse.state import Tracker, get_tracker


class _Finder:
    """The waiting processors and, while any waits, the global hooks (one instance: :data:`FINDER`)."""

    def __init__(self) -> None:
        self._waiting: weakref.WeakSet = weakref.WeakSet()
        self._handles: list[Any] = []
        self._reader_id: int | None = None
        self._opened: weakref.WeakKeyDictionary[nn.Module, Tracker] = weakref.WeakKeyDictionary()
        self._sighted: weakref.WeakKeyDictionary[nn.Module, tuple[Any, Any]] = weakref.WeakKeyDictionary()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def wait(self, processor: Any) -> None:
        """``processor`` (a new SparseProcessor) waits for its transformer; install the hooks if needed."""
        self._waiting.add(processor)
        if self._handles:
            return
        from torch.nn.modules import module as torch_module

        sight = torch_module.register_module_forward_pre_hook(self._sight)
        read = torch_module.register_module_forward_pre_hook(self._read)
        end = torch_module.register_module_forward_hook(self._end, always_call=True)
        self._handles, self._reader_id = [sight, read, end], read.id

    def stop_waiting(self, processor: Any) -> None:
        self._waiting.discard(processor)

    def _remove_if_idle(self) -> None:
        if not self._waiting and not self._opened and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles, self._reader_id = [], None

    # ---------------------------------------------------------------- hooks
    def _sight(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        if not self._waiting:
            self._remove_if_idle()
            return
        from dit_sparse.pipelines import find_adapter

        adapter = find_adapter(module)
        if adapter is None or get_tracker(module) is not None:
            return
        processor = next(
            (m.processor for _, m in adapter.self_attention_modules(module) if m.processor in self._waiting), None
        )
        if processor is None:
            return
        self._sighted[module] = (adapter, processor)
        module._forward_pre_hooks_with_kwargs[self._reader_id] = True  # torch hands _read the keywords

    def _read(self, module: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> None:
        sighted = self._sighted.pop(module, None)
        if sighted is None:
            return
        module._forward_pre_hooks_with_kwargs.pop(self._reader_id, None)
        if kwargs is None:  # a torch that does not pass keywords this way: the processor explains
            return
        adapter, processor = sighted
        processor.method.check_transformer("transformer", module)
        tracker = Tracker.attach(module, adapter)
        tracker.adopt(processor, applied=False)
        self.stop_waiting(processor)
        self._opened[module] = tracker
        tracker.begin(args, kwargs)  # the tracker's own hook starts with the next forward

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        tracker = self._opened.pop(module, None)
        if tracker is not None:
            tracker.end()
        self._remove_if_idle()


FINDER = _Finder()
