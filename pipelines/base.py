"""Adapter base: what dit_sparse needs to know about one family of Diffusers video transformers.

An adapter derives the :class:`~dit_sparse.layout.TokenLayout` of the self-attention calls from the transformer's
config and forward inputs, names the self-attention modules, knows the model's own (native) processor of every
attention module and how to install a processor on it. It never copies model code.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, ClassVar

import torch
from torch import nn

from dit_sparse.layout import TextWhere, TokenLayout


class ModelAdapter:
    """Base class of the per-family adapters (one instance per family, stateless).

    Subclasses set the class attributes and implement :meth:`layout`.

    Attributes:
        model_class: Diffusers class name of the transformer (e.g. ``"WanTransformer3DModel"``).
        family: short family name used in messages.
        self_attention: regex matched (``fullmatch``) against module names: the video self-attention modules,
            the only ones that may run sparse.
        native_processors: ``(regex, "module:Class")`` pairs giving the model's own processor class of attention
            modules whose class has no ``_default_processor_cls`` (legacy ``Attention``, ``MochiAttention``).
        text_where: where text tokens sit in the self-attention sequence.
        trims_text: the processor drops padded text per sample (Mochi): a call may hold fewer text tokens.
        key_padding_mask: the processor passes a ``(B, 1, 1, N)`` bool key-padding mask (HunyuanVideo).
        pairwise_padding_mask: the processor passes a pairwise ``(B, 1, N, N)`` bool mask ``valid_q & valid_k`` whose
            first row (a video query, always valid) is the key-padding mask (HunyuanVideo 1.5); sparse calls use that
            row, so padded condition queries attend the valid keys instead of nothing (only those rows change).
        layout_help: what the error says when a self-attention call does not match the forward's layout.
    """

    model_class: ClassVar[str] = ""
    family: ClassVar[str] = ""
    self_attention: ClassVar[str] = ""
    native_processors: ClassVar[tuple[tuple[str, str], ...]] = ()
    text_where: ClassVar[TextWhere] = "none"
    trims_text: ClassVar[bool] = False
    key_padding_mask: ClassVar[bool] = False
    pairwise_padding_mask: ClassVar[bool] = False
    layout_help: ClassVar[str] = "this model variant (or context-parallel ring attention) is not supported"

    def __init__(self) -> None:
        self._self_attention = re.compile(self.self_attention)
        self._natives = [(re.compile(p), target) for p, target in self.native_processors]
        self._signatures: dict[type, inspect.Signature] = {}

    # ------------------------------------------------------------------ inputs
    def bind(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward's arguments by name (positional ones included)."""
        cls = type(model)
        sig = self._signatures.get(cls)
        if sig is None:
            sig = self._signatures[cls] = inspect.signature(cls.forward)
        bound = sig.bind_partial(model, *args, **kwargs)
        return bound.arguments

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        """TokenLayout of the self-attention calls of one forward (``batch`` = the forward's batch)."""
        raise NotImplementedError

    def timestep(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The forward's timestep tensor (read once per forward by the state tracker)."""
        t = inputs.get("timestep")
        return t if isinstance(t, torch.Tensor) else (None if t is None else torch.as_tensor(t))

    def device(self, inputs: dict[str, Any]) -> torch.device:
        """The device the forward runs on (what times it)."""
        return inputs["hidden_states"].device

    # ------------------------------------------------------------------ modules
    def is_self_attention(self, name: str) -> bool:
        return self._self_attention.fullmatch(name) is not None

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every module holding an attention processor, in module order."""
        return [(n, m) for n, m in model.named_modules() if n and getattr(m, "processor", None) is not None]

    def self_attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.attention_modules(model) if self.is_self_attention(n)]

    def native_processor(self, name: str, module: nn.Module) -> Any:
        """A fresh instance of the model's own processor for ``module`` (used when the original is unknown)."""
        cls = getattr(type(module), "_default_processor_cls", None)
        if cls is None:
            for pattern, target in self._natives:
                if pattern.fullmatch(name):
                    cls = _import(target)
                    break
        if cls is None:
            raise TypeError(
                f"dit_sparse does not know the native processor of {self.family} module {name!r} "
                f"({type(module).__name__}); use dit_sparse.apply(...) so that the module's own processor is wrapped"
            )
        return cls()

    def check_modules(self, model: nn.Module) -> None:
        """Refuse a model without self-attention modules (before dit_sparse changes anything)."""
        if not self.self_attention_modules(model):
            raise ValueError(f"found no self-attention module in this {type(model).__name__}")

    def install(self, model: nn.Module, processor: Any, tracker: Any) -> dict[str, Any]:
        """Make ``processor`` serve the self-attention modules of ``model`` (tracked by ``tracker``); returns the
        processor each module had (module name -> processor), which ``dit_sparse.remove`` puts back."""
        from dit_sparse.processor import SparseProcessor

        originals: dict[str, Any] = {}
        for name, module in self.self_attention_modules(model):
            original = module.processor
            native = original.native_of(module) if isinstance(original, SparseProcessor) else original
            processor.bind(module, native if native is not None else self.native_processor(name, module))
            originals[name] = original
            self.set_processor(module, processor)
        return originals

    def release(self, model: nn.Module) -> None:
        """Undo what :meth:`install` did besides setting processors (nothing for a family adapter)."""

    @staticmethod
    def set_processor(module: nn.Module, processor: Any) -> None:
        """Install ``processor`` on one attention module (``set_processor`` where it exists, else the attribute)."""
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:
            module.processor = processor


def grid_5d(hidden_states: torch.Tensor, patch: tuple[int, int, int], channels_first: bool = True) -> tuple[int, ...]:
    """(T, H, W) tokens of a ``(B, C, F, H, W)`` (or ``(B, F, C, H, W)``) latent patchified by ``patch``."""
    if hidden_states.dim() != 5:
        raise ValueError(f"expected a 5-D latent, got shape {tuple(hidden_states.shape)}")
    if channels_first:
        _, _, f, h, w = hidden_states.shape
    else:
        _, f, _, h, w = hidden_states.shape
    pt, ph, pw = patch
    return f // pt, h // ph, w // pw


def _import(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(__import__(module, fromlist=[name]), name)
