"""Attention backends: what each one supports, declared once and checked before any call.

A backend is a :class:`Backend` declaration in :data:`ATTENTION_BACKENDS` (the one :class:`~dit_sparse.registry.Registry`
pattern) plus an implementation, ``fn(call: AttentionCall) -> (out, lse)``, in its own module, imported on first use
(so declaring the Triton backend needs no triton package). The declaration says which devices, dtypes, head dims,
plan features and packages it handles, the way Diffusers' attention backends declare their constraints; the kernel
entry point refuses an unsupported call up front with a message that names what is supported, and ``auto`` takes
the first registered backend (registration order is the order of preference) whose declaration accepts the call.

Adding a backend: a module with the implementation, and one ``ATTENTION_BACKENDS.register(Backend(...))`` line below.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from dit_sparse.plan import HEAD_SKIP, BlockPlan
from dit_sparse.registry import Registry

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRECISIONS = ("bf16", "fp8")
"""``precision=`` values: ``bf16`` (the inputs' own dtype; the default), ``fp8`` (SageAttention-style quantization)."""
FP8_CAPABILITY = (9, 0)
"""The CUDA capability fp8 kernels need (Hopper)."""
FP8_MIN_TILE = 32
"""The fp8 dots' smallest contraction (an 8-bit tensor-core MMA's K): fp8 needs head dims and blocks >= 32."""
FP8_NEEDS = "precision='fp8' needs the triton backend on a Hopper (sm90) or newer GPU"


@dataclass(frozen=True)
class AttentionCall:
    """One checked attention call, as every backend receives it (the contract of ``block_sparse_attention``).

    ``q, k, v`` ``[B, H, N, D]`` (any strides, original token order), ``scale`` resolved, ``kv_len`` int ``[B]`` on
    q's device or None, ``precision`` one of :data:`PRECISIONS`. A backend returns ``out`` ``[B, H, N, Dv]`` in q's dtype and, when ``return_lse``, the
    float32 ``[B, H, N]`` natural-log LSE (else None); HEAD_SKIP heads give 0 and ``-inf``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    plan: BlockPlan
    scale: float
    return_lse: bool
    kv_len: torch.Tensor | None
    precision: str = "bf16"


BackendFn = Callable[[AttentionCall], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Backend:
    """Declaration of one attention backend (defaults: supports everything, anywhere).

    Attributes:
        name: the ``backend=`` value.
        impl: ``"module:function"`` of the implementation (a :data:`BackendFn`), imported on first use.
        devices: device types it runs on natively.
        interpreter_env: environment variable that, set to ``1``, lets it also run on CPU tensors in an interpreter
            (slow: tests only; ``auto`` never counts on it).
        dtypes: q/k/v dtypes.
        head_dims: supported head dims (q's and v's), None for any.
        value_dim: whether v's head dim may differ from q's.
        lse: whether it can return the LSE.
        kv_len: whether it masks padded keys (``kv_len``).
        permuted: whether it handles plans with a token permutation.
        block_multiple: the plan's block sizes must be multiples of this.
        packages: Python packages it imports, with ``install`` saying how to get them.
        auto: whether ``auto`` may choose it.
        fp8: how it computes ``precision="fp8"``: ``"kernel"`` (natively, on CUDA capability >= :data:`FP8_CAPABILITY`;
            head dims and blocks multiples of :data:`FP8_MIN_TILE`), ``"emulated"`` (a torch emulation of the
            kernel's quantization, for tests and accuracy studies: chosen by name only, never by ``auto``), or None.
    """

    name: str
    impl: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    interpreter_env: str | None = None
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    head_dims: tuple[int, ...] | None = None
    value_dim: bool = True
    lse: bool = True
    kv_len: bool = True
    permuted: bool = True
    block_multiple: int = 1
    packages: tuple[str, ...] = ()
    install: str = ""
    auto: bool = True
    fp8: str | None = None

    # ------------------------------------------------------------------ checks
    def device_problem(self, device: torch.device | str, *, native: bool = False) -> str | None:
        """Why this backend cannot run on ``device`` (missing package, device type), or None.

        ``native``: do not count the interpreter (what ``auto`` asks)."""
        device = torch.device(device)
        missing = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if missing:
            return f"backend {self.name!r} needs the {', '.join(missing)} package: {self.install}"
        if device.type in self.devices:
            return None
        if not native and device.type == "cpu" and self.interpreter_env and os.environ.get(self.interpreter_env) == "1":
            return None
        others = [b.name for b in ATTENTION_BACKENDS if b is not self and device.type in b.devices]
        wanted = " or ".join(t.upper() for t in self.devices)
        msg = f"backend {self.name!r} needs {wanted} tensors (got {device})"
        if others:
            msg += f"; use {' or '.join(repr(o) for o in others)} on {device.type.upper()}"
        if self.interpreter_env and device.type == "cpu":
            msg += f", or set {self.interpreter_env}=1 to run it in the (slow) interpreter"
        return msg

    def call_problem(self, call: AttentionCall) -> str | None:
        """Why this backend cannot compute ``call`` (beyond the device), or None."""
        q, v, plan = call.q, call.v, call.plan
        d, dv = q.shape[-1], v.shape[-1]
        if q.dtype not in self.dtypes:
            return f"backend {self.name!r} supports dtypes {', '.join(str(t) for t in self.dtypes)} (got {q.dtype})"
        if self.head_dims is not None and (d not in self.head_dims or dv not in self.head_dims):
            dims = ", ".join(map(str, self.head_dims))
            return f"backend {self.name!r} supports head dims {dims} (got {d}" + (f", v {dv})" if dv != d else ")")
        if not self.value_dim and dv != d:
            return f"backend {self.name!r} needs v's head dim equal to q's (got {dv} vs {d})"
        if call.return_lse and not self.lse:
            return f"backend {self.name!r} does not return the LSE"
        if call.kv_len is not None and not self.kv_len:
            return f"backend {self.name!r} does not mask padded keys (kv_len)"
        if plan.perm is not None and not self.permuted:
            return f"backend {self.name!r} does not take plans with a token permutation"
        if call.precision == "fp8":
            problem = self.fp8_problem(call)
            if problem:
                return problem
        if plan.block_q % self.block_multiple or plan.block_kv % self.block_multiple:
            m = self.block_multiple
            pow2 = f" (a power-of-two factor >= {m})" if m & (m - 1) == 0 else ""
            return (
                f"backend {self.name!r} needs block sizes that are multiples of {m}{pow2}; got "
                f"block_q={plan.block_q}, block_kv={plan.block_kv}"
            )
        return None

    def fp8_problem(self, call: AttentionCall) -> str | None:
        """Why this backend cannot compute ``call`` with ``precision="fp8"``, or None."""
        if self.fp8 is None:
            return f"{FP8_NEEDS}; this is backend {self.name!r} (backend='reference' emulates it, slowly)"
        if self.fp8 == "emulated":
            return None
        q, plan = call.q, call.plan
        if q.is_cuda:
            cap = torch.cuda.get_device_capability(q.device)
            if cap < FP8_CAPABILITY:
                name = torch.cuda.get_device_name(q.device)
                return f"{FP8_NEEDS}; this is {name} (sm{cap[0]}{cap[1]})"
        m = FP8_MIN_TILE
        if q.shape[-1] % m:
            return f"precision='fp8' needs head dims that are multiples of {m} (got {q.shape[-1]})"
        if plan.block_q % m or plan.block_kv % m:
            return f"precision='fp8' needs block sizes that are multiples of {m}; got block_q={plan.block_q}, " \
                f"block_kv={plan.block_kv}"  # fmt: skip
        return None

    def check(self, call: AttentionCall) -> None:
        """RuntimeError when the device or a package is missing, ValueError when the inputs are not supported;
        both name the alternatives."""
        problem = self.device_problem(call.q.device)
        if problem:
            raise RuntimeError(problem)
        problem = self.call_problem(call)
        if problem:
            others = [b.name for b in ATTENTION_BACKENDS if b is not self and _accepts(b, call)]
            raise ValueError(problem + (f"; use backend={' or '.join(map(repr, others))}" if others else ""))

    def run(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _load(self.impl)(call)


def _accepts(backend: Backend, call: AttentionCall, native: bool = False) -> bool:
    return backend.device_problem(call.q.device, native=native) is None and backend.call_problem(call) is None


def choose_backend(call: AttentionCall, candidates: Iterable[Backend] | None = None) -> Backend:
    """``auto``: the first of ``candidates`` (default: the registered backends, in order) that ``auto`` may choose
    and that runs natively on the call's device. A call it cannot take is an error naming why and the explicit
    choices, never a silent fall back to a slower backend (on CUDA that would be the reference backend)."""
    candidates = [b for b in (ATTENTION_BACKENDS if candidates is None else candidates) if b.auto]
    device = call.q.device
    native = next((b for b in candidates if b.device_problem(device, native=True) is None), None)
    if native is None:
        problems = "; ".join(str(b.device_problem(device, native=True)) for b in candidates)
        raise RuntimeError(f"no attention backend runs on {device}: {problems}")
    if call.precision == "fp8" and native.fp8 != "kernel":
        raise ValueError(f"{FP8_NEEDS}; this is {device.type.upper()} (backend 'auto' chose {native.name!r}); pass "
                         "backend='reference' to emulate it in torch (slow: tests, accuracy studies)")  # fmt: skip
    problem = native.call_problem(call)
    if problem is not None:
        others = ", ".join(repr(b.name) for b in ATTENTION_BACKENDS if b is not native)
        raise ValueError(f"backend 'auto' chose {native.name!r} on {device.type}, which refuses this call: {problem}; "
                         f"pass backend= one of {others} explicitly to run it there (slower)")  # fmt: skip
    return native


@functools.cache
def _load(impl: str) -> BackendFn:
    module, _, fn = impl.partition(":")
    return getattr(importlib.import_module(module), fn)


def mask_skipped_heads(
    plan: BlockPlan, out: torch.Tensor, lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The HEAD_SKIP rule for backends that compute every head: those heads' output 0 and LSE ``-inf``."""
    if plan.head_mode is None or HEAD_SKIP not in plan.head_mode:
        return out, lse
    skip = torch.tensor([m == HEAD_SKIP for m in plan.head_mode], device=out.device)
    out = out.masked_fill(skip.view(1, -1, 1, 1), 0.0)
    return out, (None if lse is None else lse.masked_fill(skip.view(1, -1, 1), float("-inf")))


ATTENTION_BACKENDS: Registry[Backend] = Registry("attention backend")
"""The registered backends, in ``auto``'s order of preference."""

ATTENTION_BACKENDS.register(
    Backend(
        "triton", "dit_sparse.kernels.triton_attention:triton_block_attention", devices=("cuda",),
        interpreter_env="TRITON_INTERPRET", head_dims=(16, 32, 64, 128, 256), value_dim=False, block_multiple=16,
        packages=("triton",), install="pip install 'dit-sparse[triton]'", fp8="kernel",
    )
)  # fmt: skip
ATTENTION_BACKENDS.register(Backend("flex", "dit_sparse.kernels.flex:flex_block_attention", auto=False))
ATTENTION_BACKENDS.register(Backend("reference", "dit_sparse.kernels.reference:reference_attention", fp8="emulated"))

__all__ = ["ATTENTION_BACKENDS", "PRECISIONS", "AttentionCall", "Backend", "choose_backend", "mask_skipped_heads"]
