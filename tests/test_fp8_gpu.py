"""precision='fp8' on the GPU (Hopper sm90 or newer; skipped elsewhere): the compiled fp8 kernel against the torch
emulation and fp32 attention, every fp8 candidate configuration (pointer and TMA loads), full / random / permuted
plans, tails, padded keys, skipped heads, D64 and D128, batch 2.

Run this file on its own with ``TRITON_INTERPRET=0`` (``TRITON_INTERPRET=0 python -m pytest tests/test_fp8_gpu.py``):
the test session's conftest turns Triton's CPU interpreter on for every other test, and the kernels read that
setting when they are imported."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
    pytest.skip("needs a CUDA GPU of capability 9.0 (Hopper) or newer", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiled kernels: run this file alone with TRITON_INTERPRET=0", allow_module_level=True)

from dit_sparse.kernels import AttentionCall, block_sparse_attention
from dit_sparse.kernels.quant import quantize_fp8, quantize_fp8_reference
from dit_sparse.kernels.triton_attention import _fitted, triton_block_attention
from dit_sparse.plan import HEAD_SKIP, BlockPlan

DEV = "cuda"


def _rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _case(b, h, n, d, block, density, perm, skip, seed):
    g = torch.Generator().manual_seed(seed)
    m = -(-n // block)
    mask = torch.rand(b, h, m, m, generator=g) < density
    mask |= torch.eye(m, dtype=torch.bool)
    p = torch.randperm(n, generator=g).to(DEV) if perm else None
    hm = tuple(HEAD_SKIP if i == 1 else 0 for i in range(h)) if skip else None
    plan = BlockPlan.from_block_mask(mask.to(DEV), n, block, perm=p, head_mode=hm).check()
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    k = k + 4 * torch.randn(d, generator=g)  # a K mean (smoothed away)
    v = v + torch.randn(1, 1, h, d, generator=g)
    q, k, v = (t.to(DEV, torch.bfloat16).permute(0, 2, 1, 3) for t in (q, k, v))  # BHND views of BNHD memory
    return q, k, v, plan


CASES = [  # b, h, n, d, block, density, perm, skip, kv_len
    (1, 2, 1024, 128, 128, 1.0, False, False, False),
    (2, 3, 1000, 128, 128, 0.4, False, True, True),
    (2, 3, 777, 64, 128, 0.4, True, False, True),
    (1, 4, 1500, 64, 64, 0.3, True, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}n{}d{}blk{}dens{}{}{}{}".format(*c))
def test_fp8_kernel_matches_the_emulation_and_fp32_for_every_config(case):
    b, h, n, d, block, density, perm, skip, kvlen = case
    q, k, v, plan = _case(b, h, n, d, block, density, perm, skip, seed=n)
    kl = torch.tensor([n - 70, n][:b], device=DEV) if kvlen else None
    emu, emu_lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True, kv_len=kl,
                                          precision="fp8")  # fmt: skip
    ref, ref_lse = block_sparse_attention(q.float(), k.float(), v.float(), plan, backend="reference",
                                          return_lse=True, kv_len=kl)  # fmt: skip
    for cfg in _fitted(d, torch.bfloat16, block, block, "fp8"):
        out, lse = triton_block_attention(AttentionCall(q, k, v, plan, d**-0.5, True, kl, "fp8"), config=cfg)
        assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), cfg
        fin = torch.isfinite(ref_lse)
        assert _rel(out, emu) < 0.02, cfg
        assert _rel(out, ref) < 0.03, cfg
        assert float((lse[fin] - emu_lse[fin]).abs().max()) < 5e-3, cfg
        if skip:
            assert not out[:, 1].float().any(), cfg


def test_the_compiled_prepass_equals_the_emulation():
    q, k, v, plan = _case(2, 3, 1000, 128, 128, 0.5, True, False, seed=7)
    x = quantize_fp8(q, k, v, plan, plan.perm.to(torch.int32), 128**-0.5, True)
    r = quantize_fp8_reference(q, k, v, plan, 128**-0.5, True)
    for name in ("q", "vt"):
        mismatch = (getattr(x, name).view(torch.uint8) != getattr(r, name).view(torch.uint8)).float().mean()
        assert mismatch == 0, name
    torch.testing.assert_close(x.q_scale, r.q_scale, rtol=0, atol=0)
    torch.testing.assert_close(x.v_scale, r.v_scale, rtol=0, atol=0)
    torch.testing.assert_close(x.k_scale, r.k_scale, rtol=1e-5, atol=0)
    assert (x.k.view(torch.uint8) != r.k.view(torch.uint8)).float().mean() < 1e-3


def test_autotuned_fp8_through_the_front_door():
    q, k, v, plan = _case(1, 4, 4096, 128, 128, 0.5, False, False, seed=8)
    out = block_sparse_attention(q, k, v, plan, backend="triton", precision="fp8")
    ref = block_sparse_attention(q, k, v, plan, backend="triton")
    assert _rel(out, ref) < 0.03


def test_v_blocks_far_apart_in_magnitude():
    """The P·V sum changes units between key blocks (powers of two, exact): an all-zero V block, blocks 10⁴ apart."""
    q, k, v, plan = _case(1, 4, 1024, 128, 128, 1.0, False, False, seed=9)
    gain = torch.tensor([0.0, 1e2, 1e-2, 1.0], device=DEV).repeat_interleave(256)
    v = (v.float() * gain[None, None, :, None]).to(v.dtype)
    out = block_sparse_attention(q, k, v, plan, backend="triton", precision="fp8")
    emu = block_sparse_attention(q, k, v, plan, backend="reference", precision="fp8")
    ref = block_sparse_attention(q.float(), k.float(), v.float(), plan, backend="reference")
    assert torch.isfinite(out).all() and _rel(out, emu) < 0.01 and _rel(out, ref) < 0.03
