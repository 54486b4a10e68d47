"""Sparse attention under Diffusers' Ulysses context parallelism: 2 CPU processes (gloo) against one process, one
transformer forward and one whole generation.

Diffusers 0.42.1 computes the rank's device as ``rank % torch.accelerator.device_count()``, which divides by zero on
a CPU-only torch; the workers report one accelerator so that the mesh is built on ``cpu`` (the only shim). The
all-to-alls, the sequence split of the transformer and the attention op are Diffusers' own.
"""

from __future__ import annotations

import os
import socket

import pytest
import tiny_dit
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, method: str, params: dict, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    try:
        import dit_sparse
        from dit_sparse.parallel import enable_context_parallel, head_offset
        from dit_sparse.processor import SparseProcessor

        model, inputs = tiny_dit.wan()
        dit_sparse.apply(model, method, **params)
        single = tiny_dit.run(model, inputs)
        single_latents = tiny_dit.generate_latents(tiny_dit.wan_pipeline(model))
        dit_sparse.report(model, reset=True)
        enable_context_parallel(model, WORLD)
        seen = []
        attention = SparseProcessor.attention

        def spy(self, router, func, args, kwargs):
            seen.append(tuple(args[0].shape) if args else tuple(kwargs["query"].shape))
            return attention(self, router, func, args, kwargs)

        SparseProcessor.attention = spy
        parallel = tiny_dit.run(model, inputs)
        density = dit_sparse.report(model).effective_density
        SparseProcessor.attention = attention
        parallel_latents = tiny_dit.generate_latents(tiny_dit.wan_pipeline(model))
        proc = model.blocks[0].attn1.processor
        torch.save(
            {
                "single": single,
                "parallel": parallel,
                "seen": seen,
                "offset": head_offset(proc._parallel_config, 1),
                "density": density,
                "latents": (single_latents, parallel_latents),
            },
            f"{results}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _run(tmp_path, method: str, **params) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), method, params, str(tmp_path)), nprocs=WORLD)
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize(
    ("method", "params", "sparse"),
    [
        ("dense", {}, False),
        ("window", {"tile": (1, 4, 4), "window": (1, 0, 0), "block_size": 16, "min_seq_len": 0}, True),
        ("draft", {"pool": (4, 4), "block_size": 16, "sparsity": 0.5, "dense_steps": 0, "min_seq_len": 0}, True),
    ],
)
def test_ulysses_equals_single_process(tmp_path, method, params, sparse):
    results = _run(tmp_path, method, **params)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["parallel"], r["single"], rtol=0, atol=1e-4)
        # self-attention saw the rank's 1 of 2 heads over the full 4x8x8 video sequence, once per block
        assert r["seen"] == [(1, 1, 256, 12)] * 2
        assert r["offset"] == rank
        assert (r["density"] < 1.0) == sparse
        torch.testing.assert_close(r["latents"][1], r["latents"][0], rtol=0, atol=1e-4)  # a whole CFG generation


@pytest.mark.parametrize(
    ("method", "params", "match"),
    [("adaspa", {}, "head-adaptive"), ("radial", {"ring": True}, "ring attention")],
)
def test_unsupported_context_parallel_is_a_clear_error(method, params, match):
    from diffusers import ContextParallelConfig

    import dit_sparse
    from dit_sparse.parallel import check_context_parallel

    model, _ = tiny_dit.wan()
    ring = params.pop("ring", False)
    dit_sparse.apply(model, method, **params)
    config = ContextParallelConfig(ring_degree=2) if ring else ContextParallelConfig(ulysses_degree=2)
    with pytest.raises(NotImplementedError, match=match):
        check_context_parallel(model, config)


def test_heads_must_divide_ulysses_degree():
    from dit_sparse.parallel import enable_context_parallel

    model, _ = tiny_dit.wan()  # 2 heads
    with pytest.raises(ValueError, match="not divisible by ulysses_degree=3"):
        enable_context_parallel(model, 3)


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    from dit_sparse.cli import main

    assert main(argv) == 2
    return capsys.readouterr().err


def test_gpus_more_than_the_machine_has_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "v.mp4"
    err = _cli_error(capsys, ["generate", "a red circle", "--method", "window", "--gpus", "2", "--out", str(out)])
    assert "--gpus 2: 2 GPUs asked for, this machine has 1 CUDA device(s)" in err
    assert not out.exists()


def test_gpus_refuses_head_coupled_methods_and_a_device(capsys):
    err = _cli_error(capsys, ["generate", "a red circle", "--method", "adaspa", "--gpus", "2"])
    assert "--gpus 2: dit_sparse: method 'adaspa' is not supported" in err
    err = _cli_error(capsys, ["generate", "a red circle", "--method", "window", "--gpus", "2", "--device", "cpu"])
    assert "leave out --device cpu" in err
