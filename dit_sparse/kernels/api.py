"""The kernel entry point: input checks, then the backend its declaration accepts (``kernels/backends.py``)."""

from __future__ import annotations

import torch

from dit_sparse.kernels.backends import (
    ATTENTION_BACKENDS,
    FLOAT_DTYPES,
    PRECISIONS,
    AttentionCall,
    Backend,
    choose_backend,
)
from dit_sparse.plan import BlockPlan

BACKENDS: tuple[str, ...] = ("auto", *(b.name for b in ATTENTION_BACKENDS))
"""The ``backend=`` choices: ``auto`` and the registered backends (CLI choices, processor check)."""


def check_backend(backend: str, device: torch.device | str) -> str:
    """The backend that ``backend`` means on ``device``, before any tensor exists (the CLI asks before loading a model).

    ``auto``: the first backend ``auto`` may choose that runs natively there (triton on CUDA when installed, else
    reference; a call whose inputs triton does not take still falls back per call). Raises ValueError for an unknown
    name, RuntimeError (naming the alternatives) when the backend cannot run on ``device``.
    """
    if backend == "auto":
        return next(b.name for b in ATTENTION_BACKENDS if b.auto and b.device_problem(device, native=True) is None)
    problem = _declared(backend).device_problem(device)
    if problem:
        raise RuntimeError(problem)
    return backend


def _declared(backend: str) -> Backend:
    found = ATTENTION_BACKENDS.find(backend)
    if found is None:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return found


resolve_backend = check_backend  # the older name, used by the CLI's, eval's and the search's up-front checks


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
    if q.dtype not in FLOAT_DTYPES:
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
    precision: str = "bf16",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k, v`` restricted to the key blocks ``plan`` lists.

    Args:
        q, k, v: ``[B, H, N, D]`` (the layout ``F.scaled_dot_product_attention`` takes; any strides), one dtype
            among float16 / bfloat16 / float32.
        plan: the BlockPlan (same N; batch and heads equal or 1).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the row log-sum-exp ``[B, H, N]`` (float32, natural log) of the scaled scores.
        backend: ``auto`` (the first registered backend that takes the call natively: triton on CUDA, reference
            elsewhere or for inputs triton does not take), or a name in :data:`BACKENDS` (its declaration is checked
            first: an unsupported call is an error that names the alternatives).
        kv_len: optional int ``[B]``: keys whose original index is >= kv_len[b] are masked (padded text suffix).
        precision: ``bf16`` (default: the inputs' own dtype) or ``fp8`` (SageAttention-style: K smoothed by its mean,
            Q and K in FP8 e4m3 with per-block scales, P and V in FP8, fp32 accumulation; see
            :mod:`dit_sparse.kernels.quant`): the triton backend on Hopper (sm90) or newer GPUs, or
            ``backend="reference"``, which emulates it in torch (tests, accuracy studies).

    Returns:
        ``out`` ``[B, H, N, D]`` in q's dtype (and ``lse``). Rows of HEAD_SKIP heads are 0 with LSE ``-inf``.

    Inside code that ``torch.compile`` traces, the call is the custom op ``dit_sparse::block_sparse_attention``
    (:mod:`dit_sparse.kernels.ops`): no graph break.
    """
    check_qkv(q, k, v)
    b, h, n, d = q.shape
    plan.check_inputs(b, h, n)
    if plan.device != q.device:
        raise ValueError(f"the plan is on {plan.device} but q/k/v are on {q.device}: move it with plan.to(device)")
    if kv_len is not None:
        if kv_len.shape != (b,):
            raise ValueError(f"kv_len must have shape ({b},), got {tuple(kv_len.shape)}")
        kv_len = kv_len.to(q.device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if torch.compiler.is_compiling():  # traced: the custom op (kernels/ops.py), opaque to the compiler
        from dit_sparse.kernels.ops import traced_block_sparse_attention

        out, lse = traced_block_sparse_attention(
            q, k, v, plan, d**-0.5 if scale is None else float(scale), backend, kv_len, precision
        )
        return (out, lse) if return_lse else out
    call = AttentionCall(q, k, v, plan, d**-0.5 if scale is None else float(scale), return_lse, kv_len, precision)
    if backend == "auto":
        chosen = choose_backend(call)
    else:
        chosen = _declared(backend)
        chosen.check(call)
    out, lse = chosen.run(call)
    return (out, lse) if return_lse else out
