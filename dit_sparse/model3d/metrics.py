"""Shape agreement between two SDF volumes: occupancy IoU and the Chamfer distance between occupied cells."""

from __future__ import annotations

import torch


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of the occupancies (SDF < 0) of volumes ``[B, ...]``; 1 where both are empty."""
    oa, ob = (a < 0).flatten(1), (b < 0).flatten(1)
    inter, union = (oa & ob).sum(1).float(), (oa | ob).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample symmetric Chamfer distance (mean nearest-neighbour distance both ways, halved) between the
    centres of the occupied cells of volumes ``[B, 1, R, R, R]``, in units of the volume's half-extent ([-1, 1]
    coordinates). 0 when both are empty, ``inf`` when exactly one is."""
    res = a.shape[-1]
    out = []
    for va, vb in zip(a, b, strict=True):
        pa = ((va.reshape(res, res, res) < 0).nonzero().float() + 0.5) / res * 2 - 1
        pb = ((vb.reshape(res, res, res) < 0).nonzero().float() + 0.5) / res * 2 - 1
        if len(pa) == 0 or len(pb) == 0:
            out.append(0.0 if len(pa) == len(pb) else float("inf"))
            continue
        d = torch.cdist(pa, pb)
        out.append(0.5 * float(d.min(1).values.mean() + d.min(0).values.mean()))
    return torch.tensor(out)
