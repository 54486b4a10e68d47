"""``dense``: exact attention through the sparse machinery (every block computed); the baseline and test oracle."""

from __future__ import annotations

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.methods.base import Method, MethodConfig, register
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext


@register
class Dense(Method):
    """Every query block attends every key block: the same numbers as the model's own attention."""

    name = "dense"
    config_cls = MethodConfig

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        return BlockPlan.full(layout.seq_len, self.config.block_size, device=q.device)
