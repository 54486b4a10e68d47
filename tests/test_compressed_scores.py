"""SSA's compressed scores (dit_sparse/kernels/compressed_scores.py): the fused Triton kernel (in Triton's interpreter)
against the torch reference and a brute-force loop, and ssa's plan on either path."""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch
from host_sync import no_host_sync

from dit_sparse.kernels.compressed_scores import (
    compressed_scores,
    reference_compressed_scores,
    triton_compressed_scores,
)
from dit_sparse.layout import VoxelLayout
from dit_sparse.methods import get_method, ssa
from dit_sparse.methods.ssa import block_means
from dit_sparse.state import StepContext

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _inputs(b: int, h: int, n: int, d: int, block: int, dtype: torch.dtype, seed: int = 0):
    """q, k̄ (block means of a random k), perm and counts for ``n`` tokens in blocks of ``block``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    k = torch.randn(b, h, n, d, generator=g).to(dtype)
    perm = torch.randperm(n, generator=g)
    m = math.ceil(n / block)
    counts = torch.full((m,), float(block))
    counts[-1] = n - block * (m - 1)
    return q, block_means(k, block, perm, counts), perm, counts


def _brute(q: torch.Tensor, k_mean: torch.Tensor, block: int, perm: torch.Tensor) -> torch.Tensor:
    """Per query block (a loop), the float64 mean of its tokens' softmax rows over the compressed keys."""
    qp = q[:, :, perm].double()
    probs = torch.softmax(qp @ k_mean.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    m = k_mean.shape[2]
    return torch.stack([probs[:, :, i * block : (i + 1) * block].mean(2) for i in range(m)], 2).float()


@needs_triton
@pytest.mark.parametrize(
    ("n", "d", "block", "dtype"),
    [
        (77, 16, 16, torch.float32),  # partial last block (13 tokens)
        (101, 32, 32, torch.bfloat16),
        (150, 16, 64, torch.float16),  # M = 3: one key tile, most of it masked
        (200, 16, 24, torch.float32),  # block not a power of two: masked rows inside every query tile
        (330, 16, 160, torch.float32),  # block above 128 tokens: two query sub-tiles per block, summed
        (90, 24, 32, torch.bfloat16),  # head dim not a power of two: padded with zeros to 32
    ],
)
def test_triton_matches_reference_and_rows_sum_to_one(n, d, block, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # tests/conftest.py set it before triton was imported
    q, k_mean, perm, counts = _inputs(2, 3, n, d, block, dtype)
    got = compressed_scores(q, k_mean, block, perm, counts, backend="triton")
    ref = reference_compressed_scores(q, k_mean, block, perm, counts)
    assert got.dtype == torch.float32 and got.shape == (2, 3, len(counts), len(counts))
    # half inputs: the kernel rounds k̄ to q's dtype for the dot, the reference multiplies in float32
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ref, _brute(q, k_mean, block, perm), atol=1e-5, rtol=1e-5)
    # each query block's row is a mean of softmax rows: it sums to 1, the partial last block included
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, len(counts)), atol=1e-5, rtol=0)


@needs_triton
def test_triton_path_reads_no_device_value_on_the_host(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k_mean, perm, counts = _inputs(1, 2, 40, 16, 16, torch.float16)
    with no_host_sync():
        got = triton_compressed_scores(q, k_mean, 16, perm, counts)
    torch.testing.assert_close(got, reference_compressed_scores(q, k_mean, 16, perm, counts), atol=2e-3, rtol=2e-3)


def _shell_layout(n: int) -> VoxelLayout:
    """``n`` voxels of a sphere shell in a 14³ grid (in a scrambled order), batch 2."""
    g = torch.stack(torch.meshgrid(*[torch.arange(14)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = (g.float() - 6.5).norm(dim=1)
    c = g[(r > 4.5) & (r < 6.5)][:n]
    return VoxelLayout(c[torch.randperm(n, generator=torch.Generator().manual_seed(1))], batch=2)


@needs_triton
def test_ssa_plans_the_same_blocks_on_either_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layout = _shell_layout(203)  # N = 203: a partial last block of 11 tokens
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 3, layout.seq_len, 16, generator=g) for _ in range(2))
    ctx = StepContext(5, None, "cond", "blocks.0.attn", 0, layout)
    cfg = dict(block_size=16, cell=(2, 2, 4), topk=3, window=(1, 1, 1))
    reference = get_method("ssa", **cfg).get_plan(q, k, layout, ctx).block_mask()  # CPU: the reference path
    monkeypatch.setattr(ssa, "compressed_scores", functools.partial(compressed_scores, backend="triton"))
    fused = get_method("ssa", **cfg).get_plan(q, k, layout, ctx).block_mask()
    assert torch.equal(fused, reference)
    assert not torch.equal(fused[0], fused[1])  # the selection depends on the sample (not only the window)


def test_auto_is_the_reference_off_cuda_and_bad_inputs_are_clear_errors(monkeypatch):
    q, k_mean, perm, counts = _inputs(1, 2, 40, 24, 16, torch.float32)
    assert torch.equal(
        compressed_scores(q, k_mean, 16, perm, counts), reference_compressed_scores(q, k_mean, 16, perm, counts)
    )
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'reference'"):
        compressed_scores(q, k_mean, 16, perm, counts, backend="flex")
    with pytest.raises(ValueError, match=r"M = ceil\(N / block\) blocks are needed"):
        compressed_scores(q, k_mean, 8, perm, counts)
    with pytest.raises(ValueError, match="k_mean"):
        compressed_scores(q, k_mean[:, :1], 16, perm, counts)
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(ValueError, match="supports head dims up to 256"):
            compressed_scores(q.repeat(1, 1, 1, 20), k_mean.repeat(1, 1, 1, 20), 16, perm, counts, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):  # CPU tensors without the interpreter (or no triton)
        compressed_scores(q, k_mean, 16, perm, counts, backend="triton")
