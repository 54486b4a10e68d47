"""precision='fp8': the Triton pre-pass against its torch emulation, the emulation's accuracy (K smoothing against
channel outliers), the fp8 kernel in Triton's CPU interpreter, the errors, the config field and the CLI param."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from dit_sparse.cli import parse_params
from dit_sparse.kernels import ATTENTION_BACKENDS, AttentionCall, block_sparse_attention
from dit_sparse.kernels.quant import emulate_fp8_attention, quantize_fp8_reference
from dit_sparse.methods.base import available_methods, make_config
from dit_sparse.plan import HEAD_SKIP, BlockPlan

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # backend='triton' on CPU tensors (tests/conftest.py set it first)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _plan(b, h, n, bq, bkv=None, *, seed=0, density=0.5, perm=False, skip=False) -> BlockPlan:
    g = torch.Generator().manual_seed(seed)
    bkv = bkv or bq
    mq, mk = -(-n // bq), -(-n // bkv)
    mask = torch.rand(b, h, mq, mk, generator=g) < density
    mask[..., torch.arange(mq), torch.arange(mq) * bq // bkv] = True  # every query block keeps one key block
    p = torch.randperm(n, generator=g) if perm else None
    hm = tuple(HEAD_SKIP if i == 1 else 0 for i in range(h)) if skip else None
    return BlockPlan.from_block_mask(mask, n, bq, bkv, perm=p, head_mode=hm).check()


def _qkv(b, h, n, d, *, seed=0, dtype=torch.float32, bnhd=True, v_mean=1.0):
    """Normal inputs: q, k ~ N(0, 1); v ~ N(0, 1) plus a per-(head, channel) mean, as real values have."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    v = v + v_mean * torch.randn(1, 1, h, d, generator=g)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if bnhd:  # what Diffusers hands over: a BHND view of BNHD memory
        return tuple(t.permute(0, 2, 1, 3) for t in (q, k, v))
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# ------------------------------------------------------------------------------------------------ pre-pass
@needs_triton
@pytest.mark.parametrize(
    "b, h, n, d, bq, bkv, perm, dtype, with_lse",
    [
        (2, 3, 200, 32, 64, 64, False, torch.bfloat16, True),  # tail: 200 = 3 * 64 + 8
        (1, 2, 300, 64, 128, 128, True, torch.float32, True),  # permuted, tail
        (1, 2, 256, 32, 64, 32, True, torch.float16, False),  # block_q != block_kv, no tail
    ],
)
def test_prepass_equals_the_emulation(b, h, n, d, bq, bkv, perm, dtype, with_lse):
    from dit_sparse.kernels.quant import quantize_fp8

    q, k, v = _qkv(b, h, n, d, seed=n, dtype=dtype)
    k = k + (8 * torch.randn(d)).to(dtype)  # a mean to smooth away
    plan = _plan(b, h, n, bq, bkv, perm=perm)
    perm32 = None if plan.perm is None else plan.perm.to(torch.int32)
    x = quantize_fp8(q, k, v, plan, perm32, d**-0.5, with_lse)
    r = quantize_fp8_reference(q, k, v, plan, d**-0.5, with_lse)
    # Q and V: the same scales and the same fp8 bits; K: its mean is a float sum (last-bit differences only)
    for name in ("q", "vt", "q_scale", "v_scale"):
        assert torch.equal(_bits(getattr(x, name)), _bits(getattr(r, name))), name
    torch.testing.assert_close(x.k_mean, r.k_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.k_scale, r.k_scale, rtol=1e-5, atol=0)
    assert (x.k.view(torch.uint8) != r.k.view(torch.uint8)).float().mean() < 1e-3
    if with_lse:
        torch.testing.assert_close(x.q_dot_mean, r.q_dot_mean, rtol=1e-4, atol=1e-4)
    else:
        assert x.q_dot_mean is None and r.q_dot_mean is None
    # shapes, zero padding past N, the token order, the smoothing
    mq, mk = plan.num_q_blocks, plan.num_kv_blocks
    assert x.q.shape == (b, h, mq * bq, d) and x.k.shape == (b, h, mk * bkv, d) and x.vt.shape == (b, h, d, mk * bkv)
    assert not x.q[:, :, n:].float().any() and not x.k[:, :, n:].float().any() and not x.vt[..., n:].float().any()
    order = plan.perm if plan.perm is not None else torch.arange(n)
    k_deq = x.k.float()[:, :, :n] * x.k_scale.repeat_interleave(bkv, -1)[:, :, :n, None]
    k_smooth = k.float()[:, :, order] - r.k_mean[:, :, None, :]
    assert _rel(k_deq, k_smooth) < 0.05
    # the sample mean removes the offset (8·N(0, 1) per channel) up to the sample's error (unit spread over 8)
    assert float(k_smooth.mean(2).abs().max()) < 0.6 < 0.1 * float(k.float().mean(2).abs().max())
    v_deq = x.vt.float()[..., :n].transpose(-1, -2) * x.v_scale.repeat_interleave(bkv, -1)[:, :, :n, None]
    assert _rel(v_deq, v.float()[:, :, order]) < 0.05
    q_deq = x.q.float()[:, :, :n] * x.q_scale.repeat_interleave(bq, -1)[:, :, :n, None]
    assert _rel(q_deq / (d**-0.5 * 1.4426950408889634), q.float()[:, :, order]) < 0.05


def test_an_all_zero_block_gets_zeros_and_finite_scales():
    q, k, v = (torch.zeros(1, 1, 64, 32) for _ in range(3))
    x = quantize_fp8_reference(q, k, v, BlockPlan.full(64, 32), 32**-0.5, True)
    assert not x.q.float().any() and torch.isfinite(x.q_scale).all() and torch.isfinite(x.v_scale).all()
    out, lse = block_sparse_attention(q, k, v, BlockPlan.full(64, 32), backend="reference", return_lse=True,
                                      precision="fp8")  # fmt: skip
    assert not out.any() and torch.allclose(lse, torch.full_like(lse, 64.0).log())


def test_v_scales_are_the_smallest_powers_of_two_that_fit():
    from dit_sparse.kernels.quant import _pow2_scale

    g = torch.Generator().manual_seed(6)
    edges = torch.tensor([448.0, 224.0, 1.0, 2.0**-40, 448 * (1 + 2.0**-23), 448 * (1 - 2.0**-24), 3e4, 1e-9])
    absmax = torch.cat([edges, torch.exp(torch.empty(4000).uniform_(-60, 60, generator=g))])
    s, inv = _pow2_scale(absmax)
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all() and torch.equal(s * inv, torch.ones_like(s))  # powers of two, exact inverses
    assert (absmax <= 448 * s).all() and (absmax > 224 * s).all()  # fits, and half of it would not
    assert s[0] == 1 and s[1] == 0.5 and s[4] == 2


@needs_triton
def test_fp8_kernel_with_v_blocks_far_apart_in_magnitude():
    """The kernel's P·V sum changes units from key block to key block: an all-zero V block and blocks 10⁴ apart."""
    from dit_sparse.kernels.triton_attention import KernelConfig, triton_block_attention

    b, h, n, d, block = 1, 2, 256, 32, 64
    q, k, v = _qkv(b, h, n, d, seed=9, dtype=torch.bfloat16, bnhd=False)
    gain = torch.tensor([0.0, 1e2, 1e-2, 1.0]).repeat_interleave(block)
    v = (v.float() * gain[:, None]).to(torch.bfloat16)
    plan = _plan(b, h, n, block, seed=9, density=1.0)
    out, lse = triton_block_attention(AttentionCall(q, k, v, plan, d**-0.5, True, None, "fp8"),
                                      config=KernelConfig(32, 32, 4, 1))  # fmt: skip
    emu = block_sparse_attention(q, k, v, plan, backend="reference", precision="fp8")
    ref = block_sparse_attention(q.float(), k.float(), v.float(), plan, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _rel(out, emu) < 0.01 and _rel(out, ref) < 0.03


# ---------------------------------------------------------------------------------------------------- accuracy
def test_emulation_is_close_to_fp32_attention_on_normal_inputs():
    b, h, n, d = 1, 4, 1024, 64
    q, k, v = _qkv(b, h, n, d, seed=1, bnhd=False)
    plan = _plan(b, h, n, 128, seed=1)
    ref, ref_lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True)
    out, lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True, precision="fp8")
    assert _rel(out, ref) < 0.03
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
    assert float((lse - ref_lse).abs().max()) < 0.05


def test_k_smoothing_keeps_channel_outliers_harmless():
    b, h, n, d = 1, 4, 1024, 64
    q, k, v = _qkv(b, h, n, d, seed=2, bnhd=False)
    g = torch.Generator().manual_seed(2)
    outliers = torch.rand(d, generator=g) < 0.125
    k = k + 100 * torch.randn(h, 1, d, generator=g) * outliers  # large per-channel offsets, as DiT keys have
    plan = _plan(b, h, n, 128, seed=2)
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    call = AttentionCall(q, k, v, plan, d**-0.5, False, None, "fp8")
    smoothed = _rel(emulate_fp8_attention(call)[0], ref)
    raw = _rel(emulate_fp8_attention(call, smooth_k=False)[0], ref)
    assert smoothed < 0.03
    assert raw > 3 * smoothed and raw > 0.015  # the smoothing is what keeps it small


# ----------------------------------------------------------------------------------- the kernel, interpreted
@needs_triton
@pytest.mark.parametrize(
    "b, h, n, d, block, perm, skip, kv_len, density",
    [
        (1, 2, 256, 32, 64, False, False, False, 1.0),  # full plan
        (2, 3, 200, 32, 64, False, True, True, 0.5),  # B2, tail, HEAD_SKIP head, padded keys
        (1, 2, 230, 64, 64, True, False, True, 0.5),  # permuted, tail, padded keys, D64
    ],
)
def test_fp8_kernel_in_the_interpreter_matches_the_emulation(b, h, n, d, block, perm, skip, kv_len, density):
    from dit_sparse.kernels.triton_attention import KernelConfig, triton_block_attention

    q, k, v = _qkv(b, h, n, d, seed=n + d, dtype=torch.bfloat16)
    plan = _plan(b, h, n, block, seed=n, density=density, perm=perm, skip=skip)
    kl = torch.tensor([n - 37, n][:b]) if kv_len else None
    call = AttentionCall(q, k, v, plan, d**-0.5, True, kl, "fp8")
    out, lse = triton_block_attention(call, config=KernelConfig(32, 32, 4, 1))
    emu, emu_lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True, kv_len=kl,
                                          precision="fp8")  # fmt: skip
    ref = block_sparse_attention(q, k, v, plan, backend="reference", kv_len=kl)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.equal(torch.isfinite(lse), torch.isfinite(emu_lse))
    assert _rel(out, emu) < 0.01 and _rel(out, ref) < 0.03
    fin = torch.isfinite(emu_lse)
    assert float((lse[fin] - emu_lse[fin]).abs().max()) < 1e-3
    if skip:
        assert not out[:, 1].float().any() and torch.isinf(lse[:, 1]).all()


@needs_triton
def test_fp8_through_the_front_door_autotuner_key_and_a_small_block():
    from dit_sparse.kernels import triton_attention as ta

    q, k, v = _qkv(1, 2, 96, 32, seed=3, dtype=torch.bfloat16)
    plan = _plan(1, 2, 96, 32, seed=3)
    out = block_sparse_attention(q, k, v, plan, backend="triton", precision="fp8")
    assert ta.TUNER.last.block_n >= 32  # the fp8 P·V dot needs a contraction of 32
    assert _rel(out, block_sparse_attention(q, k, v, plan, backend="reference", precision="fp8")) < 0.01
    assert "precision" in ta.TuneKey._fields


# ------------------------------------------------------------------------------------------------------ errors
def test_precision_errors_name_what_is_supported(monkeypatch):
    q, k, v = _qkv(1, 2, 128, 32, seed=4)
    plan = BlockPlan.full(128, 64)
    with pytest.raises(ValueError, match="precision must be one of 'bf16', 'fp8'"):
        block_sparse_attention(q, k, v, plan, precision="fp16")
    needs = r"precision='fp8' needs the triton backend on a Hopper \(sm90\) or newer GPU; this is "
    with pytest.raises(ValueError, match=needs + "backend 'flex'"):
        block_sparse_attention(q, k, v, plan, backend="flex", precision="fp8")
    with pytest.raises(ValueError, match=needs + "CPU .*backend='reference'"):  # auto never picks the emulation
        block_sparse_attention(q, k, v, plan, precision="fp8")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA"):
        block_sparse_attention(q, k, v, plan, backend="triton", precision="fp8")


def test_fp8_needs_hopper_head_dims_and_blocks_of_32(monkeypatch):
    triton_backend = ATTENTION_BACKENDS.get("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    fake_q = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), shape=(1, 2, 256, 64))
    call = AttentionCall(fake_q, None, None, BlockPlan.full(256, 128), 0.125, False, None, "fp8")
    assert triton_backend.fp8_problem(call) == (
        "precision='fp8' needs the triton backend on a Hopper (sm90) or newer GPU; this is NVIDIA A100-SXM4-80GB (sm80)"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert triton_backend.fp8_problem(call) is None
    q, k, v = _qkv(1, 2, 128, 16, seed=5)
    with pytest.raises(ValueError, match="head dims that are multiples of 32"):
        block_sparse_attention(q, k, v, BlockPlan.full(128, 64), backend="triton", precision="fp8")
    q, k, v = _qkv(1, 2, 128, 32, seed=5)
    with pytest.raises(ValueError, match="block sizes that are multiples of 32; got block_q=16"):
        block_sparse_attention(q, k, v, BlockPlan.full(128, 16), backend="triton", precision="fp8")
    assert ATTENTION_BACKENDS.get("reference").fp8_problem(call) is None  # the emulation takes anything


# ---------------------------------------------------------------------------------------- config and CLI param
def test_every_method_takes_the_precision_policy_field():
    for name in available_methods():
        assert make_config(name, {}).precision == "bf16"
        assert make_config(name, {"precision": "fp8"}).precision == "fp8"
    with pytest.raises(ValueError, match=r"precision must be one of 'bf16', 'fp8', got 'fp16'"):
        make_config("window", {"precision": "fp16"})
    assert parse_params(["precision=fp8"]) == {"precision": "fp8"}


def test_the_processor_passes_the_precision_to_the_kernel_and_errors_against_exact_attention(monkeypatch):
    from tiny_dit import BUILDERS, generate_latents, wan_pipeline

    import dit_sparse
    import dit_sparse.processor as processor

    seen = []
    real = processor.block_sparse_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision", "bf16"))
        return real(*args, **kwargs)

    monkeypatch.setattr(processor, "block_sparse_attention", spy)
    model, _ = BUILDERS["wan"]()
    pipe = wan_pipeline(model)
    dit_sparse.apply(pipe, "window", tile=(1, 4, 4), window=(1, 0, 0), block_size=16, min_seq_len=0,
                     precision="fp8", backend="reference", error_sample=1)  # fmt: skip
    try:
        generate_latents(pipe)
        rep = dit_sparse.report(pipe)
    finally:
        dit_sparse.remove(pipe)
    assert seen.count("fp8") > 0 and seen.count("fp8") == seen.count("bf16")  # each sampled call: its exact reference
    assert 0 < rep.attn_error["out_rel_l2"] < 1  # sparse fp8 against exact dense attention: measured, finite
