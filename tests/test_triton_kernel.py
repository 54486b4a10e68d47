"""Triton backend against the reference on odd shapes, in Triton's CPU interpreter (small shapes only)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

if importlib.util.find_spec("triton") is None:  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)

import torch

from dit_sparse.kernels import AttentionCall, block_sparse_attention
from dit_sparse.kernels.triton_attention import KernelConfig, triton_block_attention
from dit_sparse.plan import HEAD_SKIP, BlockPlan

# tests/conftest.py sets TRITON_INTERPRET=1 before any module imports triton: the kernels run on the CPU here


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """The front door allows backend='triton' on CPU tensors only under TRITON_INTERPRET=1."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _plan(b, h, n, block, *, seed, perm=False, skip=False, density=0.4):
    g = torch.Generator().manual_seed(seed)
    m = -(-n // block)
    mask = torch.rand(b, h, m, m, generator=g) < density
    mask |= torch.eye(m, dtype=torch.bool)
    p = torch.randperm(n, generator=g) if perm else None
    hm = tuple(HEAD_SKIP if i == 1 else 0 for i in range(max(h, 3))) if skip else None
    return BlockPlan.from_block_mask(mask, n, block, perm=p, head_mode=hm).check()


def _qkv(b, h, n, d, dtype, seed, layout="bnhd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bnhd":  # what Diffusers hands over: a BHND view of BNHD memory
        return [torch.randn(b, n, h, d, generator=g).to(dtype).permute(0, 2, 1, 3) for _ in range(3)]
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


def _compare(q, k, v, plan, kv_len=None, config=None):
    d = q.shape[-1]
    out, lse = triton_block_attention(AttentionCall(q, k, v, plan, d**-0.5, True, kv_len), config=config)
    ref, ref_lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True, kv_len=kv_len)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    # output lives in BNHD memory, handed back as the BHND view
    assert out.permute(0, 2, 1, 3).is_contiguous()
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}[q.dtype]
    assert torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max() <= tol * max(1.0, ref.float().abs().max())
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.equal(lse[~fin], ref_lse[~fin])  # -inf exactly where no key is attended
    assert (lse[fin] - ref_lse[fin]).abs().max() <= 1e-3
    return out, lse


CASES = [
    # b, h, n, d, block, dtype, perm, skip, kv_len, broadcast plan, layout
    (2, 3, 150, 64, 32, torch.float16, False, False, False, False, "bnhd"),
    (2, 3, 150, 16, 64, torch.bfloat16, True, True, True, False, "bnhd"),
    (2, 3, 97, 64, 32, torch.bfloat16, True, False, False, True, "bhnd"),
    (2, 3, 128, 16, 32, torch.float16, False, True, True, True, "bnhd"),
    (2, 3, 113, 32, 16, torch.float16, True, False, True, False, "bhnd"),
    (1, 2, 100, 32, 16, torch.float32, True, False, False, False, "bnhd"),
]


@pytest.mark.parametrize("b, h, n, d, block, dtype, perm, skip, kvlen, bcast, layout", CASES)
def test_triton_matches_reference(b, h, n, d, block, dtype, perm, skip, kvlen, bcast, layout):
    plan = _plan(1 if bcast else b, 1 if bcast else h, n, block, seed=n + d, perm=perm, skip=skip)
    q, k, v = _qkv(b, h, n, d, dtype, seed=d)
    kv_len = torch.tensor([n, n - 37])[:b] if kvlen else None
    out, lse = _compare(q, k, v, plan, kv_len)
    if skip:
        assert (out[:, 1] == 0).all() and (lse[:, 1] == float("-inf")).all()


@pytest.mark.parametrize("perm", [False, True])
def test_tma_configs_match_reference(perm):
    """A TMA configuration off Hopper (its loads fall back to pointers, the rest of its path is kept): with a permuted
    plan, K and V are gathered into copies first and the kernel reads them in plan order."""
    n, block = 150, 32
    plan = _plan(2, 3, n, block, seed=7, perm=perm, skip=True)
    q, k, v = _qkv(2, 3, n, 32, torch.float16, seed=8)
    _compare(q, k, v, plan, torch.tensor([n, n - 37]), config=KernelConfig(32, 32, 4, 1, tma=True))
    _compare(q, k, v, plan, config=KernelConfig(32, 32, 4, 1, tma=True))


def test_front_door_and_tile_smaller_than_plan_block():
    """Through block_sparse_attention(backend='triton'), and with tiles that split each plan block in two."""
    n, block = 130, 64
    plan = _plan(2, 3, n, block, seed=3)
    q, k, v = _qkv(2, 3, n, 16, torch.float16, seed=4)
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    assert (out.float() - ref.float()).abs().max() <= 2e-3
    _compare(q, k, v, plan, config=KernelConfig(32, 16, 4, 1))


def test_dense_plan_equals_sdpa():
    n = 90
    plan = BlockPlan.full(n, 32)
    q, k, v = _qkv(1, 2, n, 32, torch.float32, seed=5)
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - ref).abs().max() <= 1e-5


def test_rejects_bad_inputs_with_clear_messages():
    n = 64
    plan = _plan(1, 2, n, 32, seed=0)
    q, k, v = _qkv(1, 2, n, 16, torch.float16, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        block_sparse_attention(q[:, :, :60], k[:, :, :60], v[:, :, :60], plan, backend="triton")
    with pytest.raises(ValueError, match="heads"):
        block_sparse_attention(*_qkv(1, 3, n, 16, torch.float16, seed=0), plan, backend="triton")
    with pytest.raises(ValueError, match="head dims"):
        block_sparse_attention(*_qkv(1, 2, n, 24, torch.float16, seed=0), plan, backend="triton")
    with pytest.raises(ValueError, match="one dtype"):
        block_sparse_attention(q, k.float(), v, plan, backend="triton")
    with pytest.raises(ValueError, match="power-of-two"):
        odd = BlockPlan.from_block_mask(torch.ones(1, 1, 7, 7, dtype=torch.bool), n, 10)
        block_sparse_attention(q, k, v, odd, backend="triton")
    with pytest.raises(ValueError, match="kv_len"):
        block_sparse_attention(q, k, v, plan, backend="triton", kv_len=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="kv_indices"):
        BlockPlan(
            n, 32, 32, torch.ones(1, 1, 2, dtype=torch.int32), torch.full((1, 1, 2, 2), 5, dtype=torch.int32)
        ).check()


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(1, 1, 32, 16, torch.float16, seed=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        block_sparse_attention(q, k, v, BlockPlan.full(32, 16), backend="triton")


def test_forced_configs_and_density_octaves(monkeypatch):
    from dit_sparse.kernels import triton_attention as ta

    monkeypatch.setattr(ta, "_INTERPRET", False)
    monkeypatch.setenv("DIT_SPARSE_TRITON_CONFIGS", "m128n64w4s3-tma")
    assert ta.candidate_configs(128, torch.bfloat16) == [KernelConfig(128, 64, 4, 3, tma=True)]
    monkeypatch.setenv("DIT_SPARSE_TRITON_CONFIGS", "m128n64w4s3-tma,m999")
    with pytest.raises(ValueError, match="unknown configs; choose among"):
        ta.candidate_configs(128, torch.bfloat16)
    # the autotune key's density octave: plans an octave apart are tuned apart (short rows want shallower pipelines)
    octaves = []
    for hint in (1.0, 0.5, 0.25, 0.1, 0.05, 0.001):
        plan = dataclasses.replace(_plan(1, 2, 256, 32, seed=0), density_hint=hint)
        octaves.append(ta._density_octave(plan, 2, ta._prepare(plan, 2)))
    assert octaves == [0, 1, 2, 3, 4, 5]
