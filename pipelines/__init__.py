"""One adapter per Diffusers model family: token layout, self-attention modules, native processors."""

from __future__ import annotations

from torch import nn

from dit_sparse.registry import Registry

from .base import ModelAdapter
from .cogvideox import CogVideoXAdapter
from .cosmos import CosmosAdapter
from .declared import DeclaredAdapter, LayoutSpec
from .hunyuan_video import HunyuanVideoAdapter
from .hunyuan_video15 import HunyuanVideo15Adapter
from .kandinsky5 import Kandinsky5Adapter
from .ltx import LTXAdapter
from .ltx2 import LTX2Adapter
from .mochi import MochiAdapter
from .skyreels_v2 import SkyReelsV2Adapter
from .wan import WanAdapter
from .wan_vace import WanVACEAdapter

ADAPTERS: Registry[ModelAdapter] = Registry("model adapter", key=lambda adapter: adapter.model_class)
"""One adapter per supported Diffusers transformer class, by class name (a new family: one file, one line here)."""

ADAPTERS.register(WanAdapter())
ADAPTERS.register(CogVideoXAdapter())
ADAPTERS.register(HunyuanVideoAdapter())
ADAPTERS.register(LTXAdapter())
ADAPTERS.register(MochiAdapter())
ADAPTERS.register(WanVACEAdapter())
ADAPTERS.register(SkyReelsV2Adapter())
ADAPTERS.register(CosmosAdapter())
ADAPTERS.register(HunyuanVideo15Adapter())
ADAPTERS.register(LTX2Adapter())
ADAPTERS.register(Kandinsky5Adapter())


TRANSFORMER_ATTRS = ("transformer", "transformer_2")
"""The pipeline components that hold denoising transformers (Wan 2.2 A14B has two experts)."""


def pipeline_transformers(obj: object) -> list[tuple[str, nn.Module]]:
    """(component name, transformer) pairs of a pipeline (``transformer``, ``transformer_2``), or
    ``[("transformer", obj)]`` for a transformer given alone; a clear error for anything else."""
    if isinstance(obj, nn.Module):
        return [("transformer", obj)]
    found = [(attr, getattr(obj, attr, None)) for attr in TRANSFORMER_ATTRS]
    found = [(attr, m) for attr, m in found if isinstance(m, nn.Module)]
    if not found:
        raise TypeError(f"{type(obj).__name__} is neither a transformer nor a pipeline with a `transformer` component")
    return found


def supported_models() -> list[str]:
    """Class names of the supported Diffusers transformers."""
    return ADAPTERS.names()


def find_adapter(model: nn.Module) -> ModelAdapter | None:
    """The adapter of ``model``'s class, else None (exact Diffusers classes only: a subclass may change the tokens)."""
    cls = type(model)
    adapter = ADAPTERS.find(cls.__name__)
    return adapter if adapter is not None and cls.__module__.startswith("diffusers.") else None


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``; a clear error listing the supported classes otherwise."""
    adapter = find_adapter(model)
    if adapter is None:
        raise TypeError(
            f"dit_sparse does not support {type(model).__name__}; supported transformers: "
            f"{', '.join(supported_models())}. For any other transformer whose self-attention calls "
            "torch.nn.functional.scaled_dot_product_attention, declare its token layout: dit_sparse.apply(model, "
            "method, layout=TokenLayout(frames, height, width, text_len=..., text_where=...)) or layout=<function of "
            "the forward's inputs by name returning one>"
        )
    return adapter


__all__ = [
    "ADAPTERS",
    "CogVideoXAdapter",
    "CosmosAdapter",
    "DeclaredAdapter",
    "HunyuanVideoAdapter",
    "HunyuanVideo15Adapter",
    "Kandinsky5Adapter",
    "LayoutSpec",
    "LTXAdapter",
    "LTX2Adapter",
    "MochiAdapter",
    "ModelAdapter",
    "SkyReelsV2Adapter",
    "TRANSFORMER_ATTRS",
    "WanAdapter",
    "WanVACEAdapter",
    "adapter_for",
    "find_adapter",
    "pipeline_transformers",
    "supported_models",
]
