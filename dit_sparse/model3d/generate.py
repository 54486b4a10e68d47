"""Generation with the tiny 3D model: flow sampling, mesh or point-cloud ``.ply`` export, a preview PNG.

:func:`sample` runs Euler steps of the rectified flow from noise (``s = 1``) to a shape (``s = 0``) with
classifier-free guidance (both branches in one batch). The surface is the SDF's zero level: a triangle mesh by
marching cubes when scikit-image is installed (``pip install 'dit-sparse[3d]'``), else a point cloud of the occupied
cells' centres; both are written as ASCII PLY by :func:`write_ply`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from dit_sparse.files import atomic_write_text

from .model import TinyDiT3D

STEPS = 24
GUIDANCE = 3.0


@torch.no_grad()
def sample(
    model: TinyDiT3D, prompts: list[str], seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE
) -> torch.Tensor:
    """SDF volumes ``[B, 1, R, R, R]`` for ``prompts`` (one seeded noise for the batch)."""
    cfg, device = model.config, next(model.parameters()).device
    b = len(prompts)
    words = model.encode_prompts(list(prompts) + [""] * b, device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, cfg.res, cfg.res, cfg.res, generator=g).to(device)
    times = torch.linspace(1.0, 0.0, steps + 1)
    for s, s_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        v = model(torch.cat([x, x]), torch.full((2 * b,), s, device=device), words)
        cond, uncond = v.chunk(2)
        x = x + (s_next - s) * (uncond + guidance * (cond - uncond))
    return x


def cell_points(volume: torch.Tensor) -> np.ndarray:
    """Centres in [-1, 1] of the occupied cells (SDF < 0) of one volume ``[1, R, R, R]`` or ``[R, R, R]``, ``[P, 3]``."""
    occ = volume.reshape(volume.shape[-3:]) < 0
    res = occ.shape[0]
    return ((occ.nonzero().float() + 0.5) / res * 2 - 1).cpu().numpy()


def surface(volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """``(vertices [V, 3] in [-1, 1], faces [F, 3] or None)``: a marching-cubes mesh of the zero level when
    scikit-image is installed, else the occupied cells' centres as a point cloud (faces None)."""
    vol = volume.reshape(volume.shape[-3:]).float().cpu().numpy()
    if importlib.util.find_spec("skimage") is not None and vol.min() < 0 < vol.max():
        from skimage.measure import marching_cubes

        verts, faces, _, _ = marching_cubes(np.pad(vol, 1, constant_values=1.0), level=0.0)
        return (verts - 0.5) / vol.shape[0] * 2 - 1, faces
    return cell_points(volume), None


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray | None = None) -> None:
    """ASCII PLY: vertices (x, y, z) = (width, height, depth) axes, and triangles when ``faces`` is given."""
    v = np.asarray(vertices, dtype=np.float64)[:, ::-1]  # (depth, height, width) -> (x=width, y=height, z=depth)
    lines = ["ply", "format ascii 1.0", f"element vertex {len(v)}", "property float x", "property float y"]
    lines += ["property float z"]
    if faces is not None:
        lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    lines += ["end_header", *(f"{x:.5f} {y:.5f} {z:.5f}" for x, y, z in v)]
    if faces is not None:
        lines += [f"3 {a} {b} {c}" for a, b, c in np.asarray(faces, dtype=np.int64)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_preview(path: str | Path, volume: torch.Tensor, title: str = "") -> None:
    """A PNG of the occupied cells as voxels (matplotlib; width to the right, height up, depth into the picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    occ = (volume.reshape(volume.shape[-3:]) < 0).cpu().numpy()
    fig = plt.figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot(projection="3d")
    ax.voxels(occ.transpose(2, 0, 1), facecolors="#4c8bd6", edgecolor="#1d3f6b", linewidth=0.3)  # x=w, y=d, z=h
    ax.set(xlabel="width (left → right)", ylabel="depth (front → back)", zlabel="height", title=title)
    ax.set_xlim(0, occ.shape[2])
    ax.set_ylim(0, occ.shape[0])
    ax.set_zlim(0, occ.shape[1])
    fig.savefig(path)
    plt.close(fig)


def make_sparse(model: TinyDiT3D, method: str, params: dict, backend: str = "auto") -> None:
    """``dit_sparse.apply(model, method, layout=model.token_layout())``; ``min_seq_len`` defaults to 0 here (the tiny
    model's 512-token calls are shorter than the package default of 1024, which would leave them dense)."""
    import dit_sparse

    dit_sparse.apply(model, method, layout=model.token_layout(), backend=backend, **{"min_seq_len": 0, **params})
