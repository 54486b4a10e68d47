"""Sparse attention under Diffusers context parallelism (``ModelMixin.enable_parallelism``), Ulysses only.

How Diffusers 0.42.1 runs it: ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=w))`` splits the
sequence of the transformer's blocks across ``w`` ranks (the model's ``_cp_plan``) and sets ``_parallel_config`` on
every attention processor (a :class:`~dit_sparse.processor.SparseProcessor` hands it to the native one). Only the
``native`` attention backend calls ``F.scaled_dot_product_attention`` (the call dit_sparse reroutes): under Ulysses
it all-to-alls q/k/v from ``[B, N/w, H, D]`` to ``[B, N, H/w, D]`` (rank ``r`` holds heads ``[r*H/w, (r+1)*H/w)``) and
then calls SDPA with the full sequence and the local heads. The token layout is unchanged, so every method whose
plan of a head depends on that head only (dense, radial, window, draft, rettention, svdit without a search file)
gives the single-process output on every rank.

Not supported, with a clear error (:func:`check_context_parallel`):

- ring attention (``ring_degree > 1``): Diffusers' ring loop calls the backend's forward op once per key chunk with
  ``return_lse=True``; its ``native`` op refuses LSE, and the LSE-capable backends (``_native_cudnn``,
  ``_native_flash``, ``flash``, ...) call ``torch.ops.aten`` / external kernels, never ``F.scaled_dot_product_attention``,
  and the op is not told which key chunk it gets. There is no SDPA-level call to intercept.
- methods that couple the heads of a layer: ``adaspa`` (head-adaptive sparsity ranks all heads of a layer) and
  ``svdit`` with a search file (modes are listed per global head): they need the rank's head offset
  (:func:`head_offset`), which the methods are not given yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import torch
from torch import nn

from dit_sparse.methods.base import Method
from dit_sparse.pipelines import pipeline_transformers
from dit_sparse.processor import SparseProcessor

CP_BACKEND = "native"
"""The Diffusers attention backend dit_sparse needs under context parallelism (the one that calls SDPA)."""


def head_offset(parallel_config: Any, local_heads: int) -> int:
    """Index of the rank's first head among all heads under Ulysses (``rank * H/w``); 0 without parallelism."""
    if parallel_config is None or parallel_config.context_parallel_config is None:
        return 0
    cp = parallel_config.context_parallel_config
    return cp._ulysses_local_rank * local_heads if cp.ulysses_degree > 1 else 0


def _head_coupled(method: Method) -> str | None:
    """Why ``method`` needs all heads of a layer (None: it plans each head from that head only)."""
    if method.name == "adaspa":
        return "adaspa's head-adaptive sparsity ranks all heads of a layer"
    if method.name == "svdit" and method.config.config is not None:
        return "svdit's search file lists the modes of all heads of a layer"
    return None


def check_context_parallel(transformer: nn.Module, config: Any) -> None:
    """Raise a clear error when dit_sparse cannot run ``transformer`` under the context-parallel ``config``.

    ``config`` is a Diffusers ``ContextParallelConfig``; the transformer's processors are checked as applied.
    """
    if config.ring_degree > 1:
        raise NotImplementedError(
            f"dit_sparse: ring attention (ring_degree={config.ring_degree}) is not supported: Diffusers' ring loop "
            "needs the LSE of each key chunk, which its 'native' backend (the only one that calls "
            "F.scaled_dot_product_attention, the call dit_sparse makes sparse) does not return; the LSE-capable "
            "backends call other kernels. Use ContextParallelConfig(ulysses_degree=N) instead"
        )
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if not isinstance(processor, SparseProcessor):
            continue
        backend = getattr(processor, "_attention_backend", None)
        backend = getattr(backend, "value", backend)
        if backend not in (None, CP_BACKEND):
            raise ValueError(
                f"dit_sparse under context parallelism needs the {CP_BACKEND!r} attention backend, the transformer "
                f"uses {backend!r}: call transformer.set_attention_backend({CP_BACKEND!r}) first"
            )
        check_method(processor.method)


def check_method(method: Method) -> None:
    """Raise a clear error when ``method`` cannot run under Ulysses context parallelism (it couples heads)."""
    reason = _head_coupled(method)
    if reason is not None:
        raise NotImplementedError(
            f"dit_sparse: method {method.name!r} is not supported under Ulysses context parallelism ({reason}; "
            "each rank sees a slice of the heads): use dense, radial, window, draft or rettention"
        )


def enable_context_parallel(pipe_or_transformer: Any, ulysses_degree: int) -> Any:
    """Ulysses context parallelism over ``ulysses_degree`` ranks for every transformer of a pipeline (or one).

    Call after ``dit_sparse.apply`` and ``torch.distributed.init_process_group``; sets the ``native`` attention
    backend and calls Diffusers' ``enable_parallelism``. Returns its argument.
    """
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=ulysses_degree)  # checked here; each transformer sets up its own
    transformers = [t for _, t in pipeline_transformers(pipe_or_transformer)]
    for transformer in transformers:
        heads = transformer.config.num_attention_heads
        if heads % ulysses_degree:
            raise ValueError(
                f"{type(transformer).__name__} has {heads} attention heads, not divisible by ulysses_degree="
                f"{ulysses_degree}: choose a divisor of {heads}"
            )
        transformer.set_attention_backend(CP_BACKEND)
        check_context_parallel(transformer, config)
    for transformer in transformers:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses_degree))
    return pipe_or_transformer


def launch(gpus: int, argv: list[str]) -> int:
    """Run ``python -m dit_sparse *argv`` on ``gpus`` local CUDA devices through torchrun; its exit status.

    A clear error when this machine has fewer CUDA devices.
    """
    found = torch.cuda.device_count()
    if gpus > found:
        raise ValueError(f"{gpus} GPUs asked for, this machine has {found} CUDA device(s): use at most {found}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    return subprocess.run([*cmd, "-m", "dit_sparse", *argv], check=False).returncode


def launched_rank() -> int | None:
    """Under :func:`launch`: join the process group (NCCL), use the rank's GPU, return the rank; else None."""
    if "LOCAL_RANK" not in os.environ:
        return None
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))
    return local
