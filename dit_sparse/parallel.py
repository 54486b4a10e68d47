"""Sparse attention under Diffusers context parallelism (``ModelMixin.enable_parallelism``), Ulysses only.

How Diffusers 0.42.1 runs it: ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=w))`` splits the
sequence of the transformer's blocks across ``w`` ranks (the model's ``_cp_plan``) and sets ``_parallel_config`` on
every attention processor (a :class:`~dit_sparse.processor.SparseProcessor` hands it to the native one). Only the
``native`` attention backend calls ``F.scaled_dot_product_attention`` (the call dit_sparse reroutes): under Ulysses
it all-to-alls q/k/v from ``[B, N/w, H, D]`` to ``[B, N, H/w, D]`` (rank ``r`` holds heads ``[r*H/w, (r+1)*H/w)``) and
then calls SDPA with the full sequence and the local heads. The token layout is unchanged, so a method whose plan of
a head depends on that head only (dense, radial, window, draft, rettention, ssa) gives the single-process output on
every rank. Methods that need to know which heads they hold read them from the step context
(``StepContext.head_offset``, ``layer_heads``, ``head_group``, filled from :func:`ulysses_heads`): ``svdit`` takes its
search file's modes ``[head_offset : head_offset + H/w]``, and ``adaspa``'s head-adaptive rule, which ranks all heads
of a layer, gathers the per-head recalls over the Ulysses group (:func:`gather_heads`, one small all-gather per
search). Every method then equals the single-process run.

Not supported, with a clear error (:func:`check_context_parallel`): ring attention (``ring_degree > 1``). Diffusers'
ring loop calls the backend's forward op once per key chunk with ``return_lse=True``; its ``native`` op refuses LSE,
and the LSE-capable backends (``_native_cudnn``, ``_native_flash``, ``flash``, ...) call ``torch.ops.aten`` /
external kernels, never ``F.scaled_dot_product_attention``, and the op is not told which key chunk it gets. There is
no SDPA-level call to intercept.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# dit_sparse.processor and dit_sparse.methods import this module: what it needs of them is imported where used

CP_BACKEND = "native"
"""The Diffusers attention backend dit_sparse needs under context parallelism (the one that calls SDPA)."""


@dataclass(frozen=True)
class UlyssesHeads:
    """Which heads of every attention layer a rank holds under Ulysses: ``[rank*H/degree, (rank+1)*H/degree)``."""

    rank: int
    degree: int
    group: Any  # the Ulysses process group, the one Diffusers' all-to-alls use

    def offset(self, local_heads: int) -> int:
        """Index of the rank's first head among the layer's heads, ``rank * local_heads``."""
        return self.rank * local_heads


def ulysses_heads(parallel_config: Any) -> UlyssesHeads | None:
    """The rank's heads under a Diffusers ``ParallelConfig`` with Ulysses degree > 1; None otherwise (every head).

    Diffusers' ``ulysses_anything`` mode (head counts not divisible by the degree, padded with zero heads) is refused:
    the padding heads would count among the layer's heads.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or cp.ulysses_degree <= 1:
        return None
    if getattr(cp, "ulysses_anything", False):
        raise NotImplementedError(
            "dit_sparse: ContextParallelConfig(ulysses_anything=True) is not supported (it pads the heads to a multiple "
            "of ulysses_degree): use ContextParallelConfig(ulysses_degree=N) with N dividing the number of heads "
            "(dit_sparse.parallel.enable_context_parallel)"
        )
    return UlyssesHeads(cp._ulysses_local_rank, cp.ulysses_degree, cp._ulysses_mesh.get_group())


def head_offset(parallel_config: Any, local_heads: int) -> int:
    """Index of the rank's first head among all heads under Ulysses (``rank * H/w``); 0 without parallelism."""
    heads = ulysses_heads(parallel_config)
    return 0 if heads is None else heads.offset(local_heads)


def gather_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """A per-head tensor ``[B, H/w, ...]`` of every rank of the Ulysses ``group``: ``[B, H, ...]`` in head order.

    A collective (torch's functional all-gather): every rank of the group calls it at the same point.
    """
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_gather_single(x.movedim(1, 0).contiguous(), gather_dim=0, group=group)  # dim 0 only
    out = out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out
    return out.movedim(0, 1)


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
    from dit_sparse.processor import SparseProcessor

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


def enable_context_parallel(pipe_or_transformer: Any, ulysses_degree: int) -> Any:
    """Ulysses context parallelism over ``ulysses_degree`` ranks for every transformer of a pipeline (or one).

    Call after ``dit_sparse.apply`` and ``torch.distributed.init_process_group``; sets the ``native`` attention
    backend and calls Diffusers' ``enable_parallelism``. Returns its argument.
    """
    from diffusers import ContextParallelConfig

    from dit_sparse.pipelines import pipeline_transformers

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
