"""Fault cases of the state layer: aborted generations, typed hyper-parameters, warm-up on the schedule, gradient
checkpointing, memory after a dropped transformer, processors replaced behind dit_sparse's back (fused QKV)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tiny_dit import BUILDERS, applied, flux_image, run, wan_pipeline

import dit_sparse
from dit_sparse.finder import FINDER
from dit_sparse.methods import RadialConfig, WindowConfig, get_method, parse_value
from dit_sparse.processor import SparseProcessor
from dit_sparse.registry import Registry
from dit_sparse.state import get_tracker

WINDOW = dict(tile=(1, 4, 4), window=(1, 0, 0), block_size=16, min_seq_len=0)
RADIAL = dict(block_size=16, min_window=16, decay=0.5, min_seq_len=0, dense_layers=0)


def _generate(pipe, seed: int, steps: int = 3, callback=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pipe(
        prompt_embeds=torch.randn(1, 16, 32, generator=g), negative_prompt_embeds=torch.randn(1, 16, 32, generator=g),
        height=128, width=128, num_frames=13, num_inference_steps=steps, guidance_scale=6.0, output_type="latent",
        generator=g, callback_on_step_end=callback,
    ).frames  # fmt: skip


def _raise_at_step_0(pipe, i, t, kwargs):
    raise RuntimeError("user callback failed")


class _Interrupt:
    """A forward pre-hook on the first block that raises KeyboardInterrupt once (Ctrl-C inside the forward)."""

    def __init__(self) -> None:
        self.armed = True

    def __call__(self, module, args):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "method, params",
    [
        ("adaspa", dict(block_size=16, sparsity=0.6, dense_steps=0, search_interval=2, min_seq_len=0)),
        ("rettention", dict(block_size=16, min_seq_len=0, dense_steps=0, refresh_interval=2, window=1)),
    ],
)
def test_aborted_generation_leaves_no_stale_state(method, params):
    """A pipeline call that raises in its first step (a failing callback, Ctrl-C inside the forward) never reaches
    Diffusers' end-of-call reset: the next call must still start a new generation, equal to a fresh run."""
    pipe = wan_pipeline()
    dit_sparse.apply(pipe, method, **params)
    try:
        fresh = _generate(pipe, seed=1)
        with pytest.raises(RuntimeError, match="user callback failed"):
            _generate(pipe, seed=0, callback=_raise_at_step_0)
        after_callback = _generate(pipe, seed=1)
        interrupt = _Interrupt()
        handle = pipe.transformer.blocks[1].register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            _generate(pipe, seed=0)
        handle.remove()
        after_interrupt = _generate(pipe, seed=1)
    finally:
        dit_sparse.remove(pipe)
    torch.testing.assert_close(after_callback, fresh, rtol=0, atol=0)
    torch.testing.assert_close(after_interrupt, fresh, rtol=0, atol=0)


@pytest.mark.parametrize(
    "method, params, field",
    [
        ("radial", {"sink": "false"}, "sink"),
        ("radial", {"sink": 1}, "sink"),
        ("radial", {"block_size": 100.5}, "block_size"),
        ("radial", {"block_size": True}, "block_size"),
        ("radial", {"decay": float("inf")}, "decay"),
        ("radial", {"decay": "0.2"}, "decay"),
        ("radial", {"dense_steps": "3"}, "dense_steps"),
        ("window", {"tile": (2.5, 8, 8)}, "tile"),
        ("window", {"tile": (2, 8)}, "tile"),
        ("adaspa", {"search_interval": 2.0}, "search_interval"),
        ("draft", {"pool": (8, "16")}, "pool"),
        ("rettention", {"rho_step": float("nan")}, "rho_step"),
    ],
)
def test_hyper_parameter_types_are_checked(method, params, field):
    with pytest.raises(ValueError, match=rf"\.{field} must be"):
        get_method(method, **params)


def test_hyper_parameter_values_are_normalised_and_cli_booleans_parse():
    cfg = get_method("radial", decay=1, sink=False).config
    assert cfg.decay == 1.0 and isinstance(cfg.decay, float) and cfg.sink is False
    assert get_method("window", tile=[1, 4, 4], block_size=16).config.tile == (1, 4, 4)
    assert [parse_value(t) for t in ("true", "False", "TRUE", "1,2", "0.5", "none")] == [
        True, False, True, (1, 2), 0.5, "none",
    ]  # fmt: skip


def test_typed_configs_in_the_public_api():
    model, inputs = BUILDERS["wan"]()
    with applied(model, "window", **WINDOW):
        by_name = run(model, inputs)
    with applied(model, WindowConfig(**WINDOW)):
        by_config = run(model, inputs)
        assert dit_sparse.report(model).method == "window"
    torch.testing.assert_close(by_config, by_name, rtol=0, atol=0)
    assert isinstance(SparseProcessor(RadialConfig(decay=0.3)).method.config, RadialConfig)
    with pytest.raises(TypeError, match="inside the RadialConfig"):
        dit_sparse.apply(model, RadialConfig(), decay=0.3)
    assert get_tracker(model) is None


def test_warmup_follows_the_schedule():
    cfg = RadialConfig()
    assert [cfg.warmup_steps(n) for n in (50, 25, 30, 10, None)] == [12, 6, 7, 2, 12]
    assert RadialConfig(dense_steps=3).warmup_steps(50) == 3 and RadialConfig(dense_steps=3).warmup_steps(10) == 3
    assert get_method("draft").config.warmup_steps(20) == 6 and get_method("window").config.warmup_steps(20) == 0
    pipe = wan_pipeline()
    with applied(pipe, "radial", **RADIAL):
        _generate(pipe, seed=0, steps=10)
        rep = dit_sparse.report(pipe)
    assert (rep.dense_steps, rep.num_steps) == (2, 10)  # 12 of 50, scaled: 2 of 10
    assert rep.dense_calls == 2 * 2 * 2 and rep.sparse_calls == 8 * 2 * 2  # steps x CFG passes x layers
    assert "dense warm-up: 2 steps of 10 steps" in str(rep)
    with applied(pipe, "radial", dense_steps=5, **RADIAL):  # explicit: taken as it is
        _generate(pipe, seed=0, steps=10)
        assert dit_sparse.report(pipe).dense_calls == 5 * 2 * 2


def _grads(model, inputs) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**inputs)[0].float().square().mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("method, params", [("dense", dict(block_size=16, min_seq_len=0)), ("window", WINDOW)])
def test_gradient_checkpointing_with_a_methodapplied(method, params):
    """Gradient checkpointing re-runs the blocks in backward, after the forward returned: same gradients as without."""
    model, inputs = BUILDERS["wan"]()
    model.train()
    ref = None
    with applied(model, method, **params):
        ref = _grads(model, inputs)
        model.enable_gradient_checkpointing()
        got = _grads(model, inputs)
        rep = dit_sparse.report(model)
    assert rep.calls == 2 * 2  # two forwards of two layers: the re-runs in backward are not counted
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if method == "dense":
        model.disable_gradient_checkpointing()
        for a, b in zip(_grads(model, inputs), ref, strict=True):  # dense through dit_sparse == the model's own
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_refuses_stateful_methods():
    model, inputs = BUILDERS["wan"]()
    model.train()
    model.enable_gradient_checkpointing()
    with applied(model, "adaspa", block_size=16, sparsity=0.5, dense_steps=0, min_seq_len=0):
        with pytest.raises(NotImplementedError, match="adaspa keeps per-step state.*gradient checkpointing"):
            _grads(model, inputs)


@pytest.mark.parametrize("way", ["apply", "set_attn_processor"])
def test_a_dropped_transformer_is_freed(way):
    model, inputs = BUILDERS["wan"]()
    if way == "apply":
        dit_sparse.apply(model, "window", **WINDOW)
    else:
        model.set_attn_processor(SparseProcessor("window", **WINDOW))
    run(model, inputs)
    processor = weakref.ref(model.blocks[0].attn1.processor)
    model_ref = weakref.ref(model)
    del model
    gc.collect()
    assert model_ref() is None and processor() is None
    torch.nn.Identity()(torch.zeros(1))
    assert not FINDER.installed


def test_cogvideox_fused_qkv_keeps_the_method():
    """fuse_qkv_projections() replaces every processor with a fused one: the method is kept (the fused processor is
    wrapped), so sparsity is never silently turned off; remove gives the original processors back."""
    model, inputs = BUILDERS["cogvideox"]()
    originals = dict(model.attn_processors)
    with torch.no_grad():
        ref = run(model, inputs)
    dit_sparse.apply(model, "dense", block_size=16, min_seq_len=0)
    try:
        model.fuse_qkv_projections()
        with torch.no_grad():
            out = run(model, inputs)
        rep = dit_sparse.report(model)
        procs = dict(model.attn_processors)
    finally:
        dit_sparse.remove(model)
    assert rep.sparse_calls == len(originals) and rep.calls == len(originals)
    assert all(isinstance(p, SparseProcessor) for p in procs.values())
    assert all("Fused" in type(p.native_of(m)).__name__ for m, p in _modules_and_procs(model, procs))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert {k: type(v) for k, v in model.attn_processors.items()} == {k: type(v) for k, v in originals.items()}


def _modules_and_procs(model, procs):
    return [(model.get_submodule(name.removesuffix(".processor")), p) for name, p in procs.items()]


def test_processors_replaced_after_apply_are_an_error_and_the_diffusers_way_lets_go():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, inputs = BUILDERS["wan"]()
    originals = dict(model.attn_processors)
    dit_sparse.apply(model, "window", **WINDOW)
    try:
        model.set_attn_processor(WanAttnProcessor())
        with pytest.raises(RuntimeError, match=r"were replaced after dit_sparse was applied.*dit_sparse\.remove"):
            run(model, inputs)
    finally:
        dit_sparse.remove(model)
    model.set_attn_processor(SparseProcessor("window", **WINDOW))
    run(model, inputs)
    assert get_tracker(model) is not None
    model.set_attn_processor(originals)  # the Diffusers way out
    run(model, inputs)
    assert get_tracker(model) is None


def test_remove_on_an_unsupported_model_restores_its_processors():
    model, _ = flux_image()
    before = {k: type(v) for k, v in model.attn_processors.items()}
    model.set_attn_processor(SparseProcessor("dense"))
    dit_sparse.remove(model)
    assert {k: type(v) for k, v in model.attn_processors.items()} == before


def test_wan22_experts_are_separate_layers():
    low, _ = BUILDERS["wan"]()
    high, _ = BUILDERS["wan"]()
    pipe = wan_pipeline(high, transformer_2=low, boundary_ratio=0.875)
    dit_sparse.apply(pipe, "window", **WINDOW)
    method = pipe.transformer.blocks[0].attn1.processor.method
    seen = set()
    get_plan = method.get_plan

    def spy(q, k, layout, ctx):
        seen.add(ctx.layer_key)
        return get_plan(q, k, layout, ctx)

    method.get_plan = spy
    try:
        _generate(pipe, seed=0, steps=2)
    finally:
        dit_sparse.remove(pipe)
    assert seen == {("transformer", 0), ("transformer", 1), ("transformer_2", 0), ("transformer_2", 1)}


def test_registry():
    reg: Registry = Registry("widget")
    reg.register(type("A", (), {"name": "a"}))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(type("A2", (), {"name": "a"}))
    with pytest.raises(ValueError, match=r"unknown widget 'b'; known widgets: a"):
        reg.get("b")
    assert "a" in reg and reg.names() == ["a"] and reg.find("b") is None


def test_readme_commands_each_install_what_they_need():
    """Each README command works on its own on a fresh machine: the test command installs the test extras."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    commands = re.findall(r"```bash\n(.+?)\n```", (root / "README.md").read_text(), flags=re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    generate_cmd = next(c for c in commands if "dit-sparse generate" in c)
    for cmd in (test_cmd, generate_cmd):
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")
    test_extra = re.search(r"^test = \[(.*)\]$", (root / "pyproject.toml").read_text(), flags=re.M)
    assert 'pip install -e ".[test]"' in test_cmd and test_extra
    assert {re.split(r"[<>=]", d.strip(' "'))[0] for d in test_extra.group(1).split(",")} >= {"pytest", "triton"}
    assert test_cmd.strip().endswith("python -m pytest")
    assert "python -m pytest" in (root / ".ci" / "run").read_text()


def test_readme_extend_example_runs(tmp_path):
    """The README's "extend" example registers a method that then runs through apply (in a subprocess: the
    registration would outlive the test)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = re.search(r"```python\n(# a method.*?)```", (root / "README.md").read_text(), re.S).group(1)
    code = code.replace("dit_sparse.apply(pipe,", "# dit_sparse.apply(pipe,")
    script = tmp_path / "extend.py"
    script.write_text(
        code
        + "\nimport sys\nsys.path.insert(0, sys.argv[1])\nfrom tiny_dit import BUILDERS, run\n"
        + "model, inputs = BUILDERS['wan']()\n"
        + "dit_sparse.apply(model, DiagonalConfig(width=1, block_size=16, min_seq_len=0))\n"
        + "run(model, inputs)\nprint(dit_sparse.report(model).density)\n"
    )
    res = subprocess.run(
        [sys.executable, str(script), str(root / "tests")], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert 0 < float(res.stdout.strip().splitlines()[-1]) < 0.5


def test_every_package_is_installed():
    """A non-editable install carries every sub-package (pyproject's explicit package list)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(dit_sparse[\w.]*)"', re.search(r"^packages = \[(.*)\]$", text, flags=re.M).group(1)))
    folders = {"dit_sparse": "dit_sparse", "pipelines": "dit_sparse.pipelines", "eval": "dit_sparse.eval"}
    found = set()
    for folder, package in folders.items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join((package, *rel)))
    assert found <= listed, f"not installed: {sorted(found - listed)}"


def test_no_top_level_folder_shadows_an_installed_package():
    """Commands run from the repository root (``python -m pytest``) put it first on sys.path, so none of its top-level
    packages may share its name with an installed distribution's module (transformers >= 5.25 imports the Hugging Face
    ``kernels`` package: a top-level ``kernels/`` folder here broke every Diffusers import)."""
    import importlib.metadata as md
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ours = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()} - {"dit_sparse"}
    installed = set(md.packages_distributions())
    assert ours and not ours & installed, f"top-level folders shadowing installed packages: {sorted(ours & installed)}"


def test_no_benchmark_script_shadows_an_installed_package():
    """``python benchmarks/X.py`` puts ``benchmarks/`` first on sys.path, so no script there may share its name with an
    installed module: ``benchmarks/kernels.py`` was imported by Diffusers in place of the Hugging Face ``kernels``
    package and every script that loads a pipeline failed."""
    import importlib.metadata as md
    from pathlib import Path

    scripts = {p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")}
    installed = set(md.packages_distributions())
    assert scripts and not scripts & installed, (
        f"benchmark scripts shadowing installed packages: {sorted(scripts & installed)}"
    )
