"""AdaSpa's block mass (dit_sparse/kernels/block_mass.py): torch reference and fused Triton kernel against a brute-force softmax."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from host_sync import HostSyncError, no_host_sync

from dit_sparse.kernels import block_mass as block_mass_module
from dit_sparse.kernels.block_mass import MassConfig, block_mass, candidate_configs, triton_block_mass

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _brute_mass(q: torch.Tensor, k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = q.shape[-2]
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    m = -(-n // block)
    pad = torch.zeros(*s.shape[:2], m * block, m * block)
    pad[..., :n, :n] = torch.softmax(s, -1)
    return pad.view(*s.shape[:2], m, block, m, block).sum((3, 5)), torch.logsumexp(s, -1)


@pytest.mark.parametrize("n", [64, 61])
def test_reference_matches_dense_softmax(n, monkeypatch):
    q, k = _randn(2, 3, n, 8, seed=1), _randn(2, 3, n, 8, seed=2)
    monkeypatch.setattr(block_mass_module, "_MASS_CHUNK_ELEMENTS", 2 * 3 * n * 16)  # 16 rows per chunk: several
    mass, lse = block_mass(q, k, 8)
    ref, ref_lse = _brute_mass(q, k, 8)
    torch.testing.assert_close(mass, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    rows = torch.full((mass.shape[2],), 8.0)
    rows[-1] = n - 8 * (mass.shape[2] - 1)
    torch.testing.assert_close(mass.sum(-1), rows.expand(2, 3, -1))  # each row's mass is 1
    # cached LSE (same q, k): the same scores in one pass
    again, used = block_mass(q, k, 8, lse=lse)
    assert used is lse
    torch.testing.assert_close(again, mass, atol=1e-6, rtol=1e-6)


def test_reference_bf16_and_no_host_sync():
    q, k = _randn(1, 2, 40, 8, seed=3).bfloat16(), _randn(1, 2, 40, 8, seed=4).bfloat16()
    with no_host_sync():
        mass, _ = block_mass(q, k, 8)
    ref, _ = _brute_mass(q, k, 8)
    torch.testing.assert_close(mass, ref, atol=2e-2, rtol=2e-2)  # scores rounded to bf16 before the exp
    with pytest.raises(HostSyncError), no_host_sync():
        bool(mass.sum() > 0)


def test_bad_inputs_are_clear_errors():
    q = _randn(1, 2, 40, 8)
    with pytest.raises(ValueError, match="lse must be float32 of shape"):
        block_mass(q, q, 8, lse=torch.zeros(1, 2, 39))
    with pytest.raises(ValueError, match="block must be >= 1"):
        block_mass(q, q, 0)
    with pytest.raises(ValueError, match="unknown attention backend"):
        block_mass(q, q, 8, backend="cuda")


@needs_triton
@pytest.mark.parametrize(
    ("b", "h", "n", "d", "block", "dtype"),
    [
        (1, 2, 64, 16, 16, torch.float32),  # tiles equal the block
        (2, 3, 77, 32, 16, torch.float32),  # partial last block, batch > 1
        (1, 2, 150, 16, 48, torch.float32),  # block not a power of two: masked tiles inside each block
        (1, 1, 300, 16, 256, torch.float32),  # block larger than one tile: query and key sub-tiles
        (1, 2, 100, 64, 32, torch.bfloat16),
        (1, 2, 100, 64, 32, torch.float16),
    ],
)
def test_triton_matches_reference(b, h, n, d, block, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # tests/conftest.py set it before triton was imported
    g = torch.Generator().manual_seed(n + block)
    # BHND views of BNHD memory, as Diffusers hands them over
    q, k = (torch.randn(b, n, h, d, generator=g).to(dtype).permute(0, 2, 1, 3) for _ in range(2))
    ref, ref_lse = block_mass(q, k, block, backend="reference")
    mass, lse = block_mass(q, k, block, backend="triton")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert mass.shape == ref.shape and mass.dtype == torch.float32
    torch.testing.assert_close(mass, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    # with a given (here: slightly stale) LSE, one pass normalised by it
    stale = ref_lse + 0.25
    cached, used = block_mass(q, k, block, lse=stale, backend="triton")
    assert used is stale
    torch.testing.assert_close(cached, block_mass(q, k, block, lse=stale, backend="reference")[0], atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize(("n", "block", "group"), [(100, 16, 2), (130, 32, 4), (64, 16, 4)])
def test_triton_query_block_groups(n, block, group, monkeypatch):
    """Several query blocks per program (the fast configs for 64-token blocks), with a partial last group."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k = _randn(2, 2, n, 32, seed=5), _randn(2, 2, n, 32, seed=6)
    ref, ref_lse = block_mass(q, k, block, backend="reference")
    mass, lse = triton_block_mass(q, k, block, None, 32**-0.5, config=MassConfig(group, 4, 1))
    torch.testing.assert_close(mass, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="power-of-two block"):
        triton_block_mass(q, k, 48, None, 32**-0.5, config=MassConfig(2, 4, 1))


def test_candidate_configs():
    assert candidate_configs(64, interpret=True) == [MassConfig(1, 4, 1)]
    assert [c.group for c in candidate_configs(64, interpret=False)] == [2, 2, 1]  # 128-row tiles first
    assert [c.group for c in candidate_configs(16, interpret=False)] == [8, 8, 1]
    assert {c.group for c in candidate_configs(48, interpret=False)} == {1}  # not a power of two
    assert {c.group for c in candidate_configs(128, interpret=False)} == {1}
