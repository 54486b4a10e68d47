"""Per-step state handed to methods: where in the denoising loop and in the model an attention call is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    """

    step: int
    timestep: float | None
    cfg_pass: str
    layer: str
    layer_index: int
    layout: TokenLayout
    cache: dict[str, Any] = field(default_factory=dict)
