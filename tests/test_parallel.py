"""Sparse attention under Diffusers' Ulysses context parallelism: 2 CPU processes (gloo) against one process, one
transformer forward and one whole generation, for methods that plan each head alone and for those that need to know
which heads a rank holds (adaspa's head-adaptive rule ranks every head of a layer; svdit's search file lists them all).

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


def _wan(heads: int) -> tuple[torch.nn.Module, dict]:
    """The tiny Wan of ``tiny_dit`` (2 heads of 12), or the same with ``heads`` heads of 12."""
    from diffusers import WanTransformer3DModel

    from dit_sparse.eval.testing import TINY_WAN_CONFIG

    model, inputs = tiny_dit.wan()
    if heads != model.config.num_attention_heads:
        torch.manual_seed(0)
        model = WanTransformer3DModel(**{**TINY_WAN_CONFIG, "num_attention_heads": heads}).eval()
    return model, inputs


def _worker(rank: int, port: int, method: str, params: dict, heads: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    try:
        import dit_sparse
        from dit_sparse.parallel import enable_context_parallel, head_offset
        from dit_sparse.processor import SparseProcessor

        model, inputs = _wan(heads)
        dit_sparse.apply(model, method, **params)
        seen, contexts = [], []
        attention, sparse = SparseProcessor.attention, SparseProcessor._sparse

        def spy(self, router, func, args, kwargs):
            seen.append(tuple(args[0].shape) if args else tuple(kwargs["query"].shape))
            return attention(self, router, func, args, kwargs)

        def spy_context(self, q, k, v, layout, ctx, *rest):
            contexts.append((ctx.head_offset, ctx.layer_heads, q.shape[1], ctx.head_group is not None))
            return sparse(self, q, k, v, layout, ctx, *rest)

        SparseProcessor._sparse = spy_context
        single = tiny_dit.run(model, inputs)
        single_contexts, contexts = contexts, []
        single_latents = tiny_dit.generate_latents(tiny_dit.wan_pipeline(model))
        dit_sparse.report(model, reset=True)
        enable_context_parallel(model, WORLD)
        contexts = []
        SparseProcessor.attention = spy
        parallel = tiny_dit.run(model, inputs)
        density = dit_sparse.report(model).effective_density
        SparseProcessor.attention, SparseProcessor._sparse = attention, sparse
        parallel_latents = tiny_dit.generate_latents(tiny_dit.wan_pipeline(model))
        proc = model.blocks[0].attn1.processor
        torch.save(
            {
                "single": single,
                "parallel": parallel,
                "seen": seen,
                "contexts": (single_contexts, contexts),
                "offset": head_offset(proc._parallel_config, 1),
                "density": density,
                "latents": (single_latents, parallel_latents),
            },
            f"{results}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _run(tmp_path, method: str, heads: int = 2, **params) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), method, params, heads, str(tmp_path)), nprocs=WORLD)
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]


def _check_equal(results: list[dict], heads: int, sparse: bool) -> None:
    local = heads // WORLD
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["parallel"], r["single"], rtol=0, atol=1e-4)
        # self-attention saw the rank's heads over the full 4x8x8 video sequence, once per block
        assert r["seen"] == [(1, local, 256, 12)] * 2
        assert r["offset"] == rank
        single, parallel = r["contexts"]
        assert single and set(single) == {(0, heads, heads, False)}  # one process: every head
        # the sparse calls (draft keeps its first layer dense) see StepContext.head_offset = rank * H_local
        assert parallel == [(rank * local, heads, local, True)] * len(single)
        assert (r["density"] < 1.0) == sparse
        torch.testing.assert_close(r["latents"][1], r["latents"][0], rtol=0, atol=1e-4)  # a whole CFG generation


@pytest.mark.parametrize(
    ("method", "params", "sparse"),
    [
        ("dense", {}, False),
        ("window", {"tile": (1, 4, 4), "window": (1, 0, 0), "block_size": 16, "min_seq_len": 0}, True),
        ("draft", {"pool": (4, 4), "block_size": 16, "sparsity": 0.5, "dense_steps": 0, "min_seq_len": 0}, True),
    ],
)
def test_ulysses_equals_single_process(tmp_path, method, params, sparse):
    _check_equal(_run(tmp_path, method, **params), 2, sparse)


ADASPA = {"block_size": 16, "dense_steps": 0, "min_seq_len": 0, "search_interval": 1}


@pytest.mark.parametrize("heads", [2, 4])
def test_ulysses_adaspa_equals_single_process(tmp_path, heads):
    """recall=0: every head counts as easy, so the rule always moves half of the layer's heads up and half down;
    which half depends on all heads' recalls (with 2 heads each rank holds one and alone could not rank it). Two
    steps: the first search (dense pass, the forward's dense output) and a cached-LSE search with a sparse output,
    each ranking the gathered recalls."""
    _check_equal(_run(tmp_path, "adaspa", heads, recall=0.0, **ADASPA), heads, False)


def test_ulysses_svdit_search_file_equals_single_process(tmp_path):
    """4 heads, different modes per head: rank 1 must run the file's heads 2-3 (a multi-diagonal head makes rank 0
    launch two plans)."""
    from dit_sparse.methods.svdit import save_config

    layers = {
        "0": ["dense", "multi_diagonal", "diagonal", "skip"],
        "1": ["vertical_stripe", "diagonal", "skip", "dense"],
    }
    path = tmp_path / "svdit.json"
    save_config({"format": "dit-sparse/svdit", "version": 1, "heads": 4, "num_layers": 2, "layers": layers}, path)
    _check_equal(_run(tmp_path, "svdit", 4, config=str(path), block_size=16, min_seq_len=0), 4, True)


def test_svdit_modes_of_a_rank_are_its_slice_of_the_file(tmp_path):
    from dit_sparse.methods import get_method
    from dit_sparse.methods.svdit import SvditConfigError, save_config

    modes = ["dense", "multi_diagonal", "diagonal", "skip"]
    path = tmp_path / "svdit.json"
    save_config({"format": "dit-sparse/svdit", "version": 1, "heads": 4, "num_layers": 1, "layers": {"0": modes}}, path)
    method = get_method("svdit", config=path)
    assert method.layer_modes(0, 2, head_offset=0, layer_heads=4) == modes[:2]
    assert method.layer_modes(0, 2, head_offset=2, layer_heads=4) == modes[2:]
    with pytest.raises(SvditConfigError, match="lists 4 heads for layer 0, the model has 8"):
        method.layer_modes(0, 4, head_offset=4, layer_heads=8)  # 8 heads over 2 ranks: not this file's model


def test_ring_attention_is_a_clear_error():
    from diffusers import ContextParallelConfig

    import dit_sparse
    from dit_sparse.parallel import check_context_parallel

    model, _ = tiny_dit.wan()
    dit_sparse.apply(model, "radial")
    with pytest.raises(NotImplementedError, match="ring attention"):
        check_context_parallel(model, ContextParallelConfig(ring_degree=2))
    dit_sparse.apply(model, "adaspa")  # no method is refused under Ulysses
    check_context_parallel(model, ContextParallelConfig(ulysses_degree=2))


def test_ulysses_anything_is_a_clear_error():
    from diffusers import ContextParallelConfig, ParallelConfig

    from dit_sparse.parallel import ulysses_heads

    assert ulysses_heads(None) is None
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    with pytest.raises(NotImplementedError, match="ulysses_anything=True"):
        ulysses_heads(config)


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


def test_gpus_refuses_a_device_not_a_method(capsys):
    err = _cli_error(capsys, ["generate", "a red circle", "--method", "adaspa", "--gpus", "2", "--device", "cpu"])
    assert "leave out --device cpu" in err
    assert "not supported" not in err
