"""Backend declarations: each constraint refused up front with a clear message, the device check without tensors,
and the choice ``auto`` makes (CPU; the Triton kernel itself is tested in test_triton_kernel.py)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from dit_sparse.kernels import (
    ATTENTION_BACKENDS,
    BACKENDS,
    AttentionCall,
    Backend,
    block_sparse_attention,
    check_backend,
)
from dit_sparse.kernels.backends import choose_backend
from dit_sparse.plan import BlockPlan


def _call(n=64, d=16, dv=None, block=16, dtype=torch.float32, lse=False, kv_len=None, perm=False):
    q = torch.randn(1, 2, n, d, dtype=dtype)
    v = torch.randn(1, 2, n, dv or d, dtype=dtype)
    plan = BlockPlan.from_block_mask(
        torch.ones(-(-n // block), -(-n // block), dtype=torch.bool), n, block, perm=torch.randperm(n) if perm else None
    )
    return AttentionCall(q, q, v, plan, d**-0.5, lse, kv_len)


def test_backends_are_auto_plus_the_registered_names_in_order_of_preference():
    assert BACKENDS == ("auto", "triton", "flex", "reference")
    assert [b.name for b in ATTENTION_BACKENDS] == list(BACKENDS[1:])
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'; choose one of auto, triton, flex"):
        check_backend("cuda", "cpu")


def test_check_backend_answers_per_device_without_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert check_backend("auto", "cpu") == "reference"
    assert check_backend("reference", torch.device("cpu")) == "reference"
    assert check_backend("flex", "cpu") == "flex"
    with pytest.raises(RuntimeError) as err:
        check_backend("triton", "cpu")
    if importlib.util.find_spec("triton") is not None:
        assert str(err.value) == (
            "backend 'triton' needs CUDA tensors (got cpu); use 'flex' or 'reference' on CPU, "
            "or set TRITON_INTERPRET=1 to run it in the (slow) interpreter"
        )
        assert check_backend("triton", "cuda:1") == "triton" and check_backend("auto", "cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter lets triton run on CPU, but auto never picks it
    if importlib.util.find_spec("triton") is not None:
        assert check_backend("triton", "cpu") == "triton"
    assert check_backend("auto", "cpu") == "reference"
    with pytest.raises(RuntimeError, match=r"backend 'reference' needs CPU or CUDA tensors \(got meta\)"):
        check_backend("reference", "meta")


def test_a_missing_package_is_named_with_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"needs the triton package: pip install 'dit-sparse\[triton\]'"):
        check_backend("triton", "cuda")
    assert check_backend("auto", "cuda") == "reference"


NARROW = Backend(
    "narrow", "unused:fn", devices=("cpu",), dtypes=(torch.float32,), head_dims=(16, 32), value_dim=False,
    lse=False, kv_len=False, permuted=False, block_multiple=16,
)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype=torch.float16), r"'narrow' supports dtypes torch.float32 \(got torch.float16\)"),
        (dict(d=24), r"'narrow' supports head dims 16, 32 \(got 24\)"),
        (dict(dv=24), r"'narrow' supports head dims 16, 32 \(got 16, v 24\)"),
        (dict(dv=32), r"'narrow' needs v's head dim equal to q's \(got 32 vs 16\)"),
        (dict(lse=True), "'narrow' does not return the LSE"),
        (dict(kv_len=torch.tensor([60])), r"'narrow' does not mask padded keys \(kv_len\)"),
        (dict(perm=True), "'narrow' does not take plans with a token permutation"),
        (dict(n=60, block=10), r"multiples of 16 \(a power-of-two factor >= 16\); got block_q=10, block_kv=10"),
    ],
)
def test_each_declared_constraint_is_refused_naming_the_alternatives(kwargs, message):
    call = _call(**kwargs)
    assert NARROW.call_problem(_call()) is None
    with pytest.raises(ValueError, match=message) as err:
        NARROW.check(call)
    assert "use backend=" in str(err.value) and "'reference'" in str(err.value)  # reference takes every call
    with pytest.raises(RuntimeError, match=r"'narrow' needs CPU tensors \(got meta\)"):
        NARROW.check(dataclasses.replace(call, q=call.q.to("meta")))


def test_the_front_door_checks_the_declaration_before_running(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    call = _call(d=24)
    with pytest.raises(ValueError, match=r"'triton' supports head dims 16, 32, 64, 128, 256 \(got 24\); use backend="):
        block_sparse_attention(call.q, call.k, call.v, call.plan, backend="triton")


def test_auto_takes_the_devices_backend_and_never_falls_back_silently():
    triton_here = dataclasses.replace(ATTENTION_BACKENDS.get("triton"), devices=("cpu",), packages=())
    order = [triton_here, ATTENTION_BACKENDS.get("flex"), ATTENTION_BACKENDS.get("reference")]
    assert choose_backend(_call(), order).name == "triton"
    for call in (_call(d=24), _call(n=60, block=10), _call(dv=32)):  # triton refuses: an error, not the reference
        with pytest.raises(ValueError, match=r"'auto' chose 'triton' on cpu, which refuses this call: .*explicitly"):
            choose_backend(call, order)
    assert choose_backend(_call()).name == "reference"  # the real triton declaration needs CUDA
    assert choose_backend(_call(d=24)).name == "reference"  # on CPU the reference takes any head dim
    with pytest.raises(RuntimeError, match="no attention backend runs on meta: .*needs CPU tensors"):
        choose_backend(dataclasses.replace(_call(), q=torch.zeros(1, 2, 64, 16, device="meta")), order[1:2] + [NARROW])


def _zeros(call: AttentionCall):
    return torch.zeros_like(call.q), None


def test_a_backend_is_one_declaration_pointing_at_a_function_of_the_call():
    """What a new backend's file provides: ``fn(call) -> (out, lse)``, imported when the backend first runs."""
    call = _call()
    out, lse = Backend("zeros", f"{__name__}:_zeros").run(call)
    assert lse is None and torch.equal(out, torch.zeros_like(call.q))
