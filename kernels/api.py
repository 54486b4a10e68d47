"""The kernel entry point: input checks, backend choice, and the steps every backend shares."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from dit_sparse.plan import HEAD_SKIP, BlockPlan

BACKENDS = ("auto", "triton", "flex", "reference")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BackendFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def triton_available_for(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend that ``backend`` means for tensors on ``device`` (``auto``: triton on CUDA, else reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available_for(device) else "reference"
    if backend == "triton" and not triton_available_for(device):
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("backend='triton' needs the triton package: pip install 'dit-sparse[triton]'")
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device}); use backend='reference' or 'flex' on CPU, "
            "or set TRITON_INTERPRET=1 to run the Triton kernel in the (slow) interpreter"
        )
    return backend


def _backend_fn(name: str) -> BackendFn:
    if name == "reference":
        from dit_sparse.kernels.reference import reference_attention

        return reference_attention
    if name == "flex":
        from dit_sparse.kernels.flex import flex_block_attention

        return flex_block_attention
    from dit_sparse.kernels.triton_attention import triton_block_attention

    return triton_block_attention


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Self-attention inputs ``[B, H, N, D]`` of one float dtype on one device (no device sync)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, tokens, head_dim]; got shape {tuple(t.shape)}")
    if not (q.shape == k.shape and k.shape[:-1] == v.shape[:-1]):
        raise ValueError(
            f"q, k, v must share [batch, heads, tokens] and q/k the head_dim (self-attention); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}: cast them first")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q/k/v dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k, v`` restricted to the key blocks ``plan`` lists.

    Args:
        q, k, v: ``[B, H, N, D]`` (the layout ``F.scaled_dot_product_attention`` takes; any strides), one dtype
            among float16 / bfloat16 / float32.
        plan: the BlockPlan (same N; batch and heads equal or 1).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the row log-sum-exp ``[B, H, N]`` (float32, natural log) of the scaled scores.
        backend: ``auto`` (triton on CUDA, reference elsewhere), ``triton``, ``flex`` or ``reference``.
        kv_len: optional int ``[B]``: keys whose original index is >= kv_len[b] are masked (padded text suffix).

    Returns:
        ``out`` ``[B, H, N, D]`` in q's dtype (and ``lse``). Rows of HEAD_SKIP heads are 0 with LSE ``-inf``.
    """
    check_qkv(q, k, v)
    b, h, n, d = q.shape
    plan.check_inputs(b, h, n)
    if plan.device != q.device:
        raise ValueError(f"the plan is on {plan.device} but q/k/v are on {q.device}: move it with plan.to(device)")
    if kv_len is not None and kv_len.shape != (b,):
        raise ValueError(f"kv_len must have shape ({b},), got {tuple(kv_len.shape)}")
    scale = d**-0.5 if scale is None else float(scale)
    out, lse = _backend_fn(resolve_backend(backend, q.device))(q, k, v, plan, scale, return_lse, kv_len)
    return (out, lse) if return_lse else out


def skip_head_mask(plan: BlockPlan, device: torch.device) -> torch.Tensor | None:
    """Bool ``[H]`` of HEAD_SKIP heads, or None when the plan skips none."""
    if plan.head_mode is None or HEAD_SKIP not in plan.head_mode:
        return None
    return torch.tensor([m == HEAD_SKIP for m in plan.head_mode], device=device)
