"""``dit_sparse.search``: the offline Sparse-vDiT search over a few prompts, written as a configuration JSON.

The method that measures each candidate mode and the selection rules are in :mod:`dit_sparse.methods.svdit_search`;
the file format in :mod:`dit_sparse.methods.svdit`. Every transformer of the pipeline (Wan 2.2's experts
``transformer`` and ``transformer_2``) is searched with its own statistics, keyed by (component, layer index), and
gets its own section of the file; with one transformer the file is that section.

Resumable: results go to the output JSON after every prompt (``"complete": false`` until the end); a rerun with the
same output file skips finished layers and, in the unfinished pass, the prompts already measured.
``layers_per_pass`` (default: all layers in one pass) searches the layers in groups, earlier groups fixed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_sparse.api import apply, remove
from dit_sparse.files import atomic_write_json
from dit_sparse.methods.svdit import (
    CONFIG_FORMAT,
    MODES,
    SvditConfig,
    config_fingerprint,
    layout_record,
    modes_density,
    save_config,
)
from dit_sparse.methods.svdit_search import SearchSettings, SvditSearch, choose_modes, head_errors, new_state
from dit_sparse.pipelines import adapter_for, pipeline_transformers

CONFIG_VERSION = 2  # 2: per-transformer sections, the model's class and config fingerprint

Searched = list[tuple[str, nn.Module, SvditSearch, int]]  # (component, transformer, its method, self-attention layers)


def _install(
    components: list[tuple[str, nn.Module]], config: SvditConfig, settings: SearchSettings, state: dict, backend: str
) -> Searched:
    """Dense processors on every transformer, each then running its own :class:`SvditSearch` (sharing ``state``)."""
    searched = []
    for name, model in components:
        apply(model, "dense", backend=backend, min_seq_len=0)
        method = SvditSearch(config, settings, state, backend=backend, transformer=name)
        modules = adapter_for(model).self_attention_modules(model)
        for proc in {id(m.processor): m.processor for _, m in modules}.values():
            proc.method = method
        searched.append((name, model, method, len(modules)))
    return searched


def _upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state of version 1 (keyed by the layer index alone) as the state of ``transformer``."""
    for key in ("stats", "finished"):
        if state.get(key) and all(str(k).isdigit() for k in state[key]):
            state[key] = {"transformer": state[key]}
    return state


def _prompt_key(i: int, prompt: Any) -> str:
    return f"{i}:{prompt}" if isinstance(prompt, str) else f"{i}:<kwargs>"


def search(
    pipe: Any,
    prompts: Sequence[str | dict[str, Any]],
    out: str | Path,
    *,
    steps: int = 10,
    settings: SearchSettings | None = None,
    layers_per_pass: int | None = None,
    seed: int = 0,
    backend: str = "auto",
    block_size: int = 128,
    diag_window: float = 1.0,
    multi_window: float = 1.0,
    stripe_frames: int = 1,
    progress: bool = True,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Search a Sparse-vDiT configuration for ``pipe`` and write it to ``out`` (JSON); returns it.

    Args:
        pipe: a Diffusers video pipeline (its ``transformer`` and ``transformer_2``), callable.
        prompts: prompt strings, or dicts of call keyword arguments (e.g. ``prompt_embeds``) per generation.
        out: output JSON; an unfinished one from an earlier run is resumed.
        steps: ``num_inference_steps`` of each generation (default 10); every step is measured.
        settings: :class:`SearchSettings` (selection rule, budget, feed-forward; default ``SearchSettings()``).
        layers_per_pass: search this many layers per pass over the prompts (default all at once).
        seed: generator seed of each generation (default 0).
        backend: kernel backend of the candidates and of the cost model (default ``auto``: triton on CUDA).
        block_size, diag_window, multi_window, stripe_frames: the mode geometry (see ``SvditConfig``).
        progress: show a progress bar (default True).
        **call_kwargs: more pipeline call arguments (``height``, ``width``, ``num_frames``, ``guidance_scale``...).
    """
    from tqdm.auto import tqdm

    settings = settings or SearchSettings()
    out = Path(out)
    geometry = {"diag_window": diag_window, "multi_window": multi_window, "stripe_frames": stripe_frames,
                "block_size": block_size}  # fmt: skip
    state = new_state()
    if out.exists():
        try:
            previous = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot resume from {str(out)!r}: {exc}; delete it to start over") from exc
        if previous.get("params", geometry) != geometry:
            raise ValueError(
                f"{str(out)!r} was searched with {previous.get('params')}, this run asks for {geometry}: "
                "use another output file"
            )
        state = _upgrade_state(previous.get("search", {}).get("state", state))
        if previous.get("complete"):
            return previous
    config = SvditConfig(block_size=block_size, diag_window=diag_window, multi_window=multi_window,
                         stripe_frames=stripe_frames, min_seq_len=0)  # fmt: skip
    components = pipeline_transformers(pipe)
    try:
        searched = _install(components, config, settings, state, backend)
        todo = [
            (name, i) for name, _, _, n in searched for i in range(n) if str(i) not in state["finished"].get(name, {})
        ]
        per_pass = layers_per_pass or max(1, len(todo))
        groups = [todo[i : i + per_pass] for i in range(0, len(todo), per_pass)]
        bar = tqdm(total=len(groups) * len(prompts), desc="svdit search", disable=not progress)
        for group in groups:
            for _, _, method, _ in searched:
                method.active_layers = set(group)
            for i, prompt in enumerate(prompts):
                key = _prompt_key(i, prompt)
                if key not in state["done_prompts"]:
                    kwargs = dict(call_kwargs)
                    kwargs.update(prompt if isinstance(prompt, dict) else {"prompt": prompt})
                    kwargs.setdefault("num_inference_steps", steps)
                    kwargs.setdefault("generator", torch.Generator(device="cpu").manual_seed(seed))
                    kwargs.setdefault("output_type", "latent")
                    bar.set_postfix(layers=f"{':'.join(map(str, group[0]))}-{':'.join(map(str, group[-1]))}", prompt=i)
                    pipe(**kwargs)
                    state["done_prompts"].append(key)
                    atomic_write_json(out, _document(state, settings, searched, geometry, pipe, complete=False))
                bar.update(1)
            for name, layer in group:
                stats = state["stats"].get(name, {}).get(str(layer))
                if stats is None:
                    raise RuntimeError(
                        f"the search saw no sparse self-attention call for layer {layer} of {name}: are the sequences "
                        "shorter than the method's min_seq_len, or did the pipeline not call this transformer (Wan "
                        "2.2: the boundary_ratio may leave one expert no step of so few)?"
                    )
                state["finished"].setdefault(name, {})[str(layer)] = choose_modes(stats, settings, state.get("cost"))
            state["done_prompts"] = []
            atomic_write_json(out, _document(state, settings, searched, geometry, pipe, complete=False))
        bar.close()
    finally:
        for _, model in components:
            remove(model)
    data = _document(state, settings, searched, geometry, pipe, complete=True)
    save_config(data, out)
    return data


def _section(
    name: str, model: nn.Module, method: SvditSearch, num_layers: int, state: dict, geometry: dict, pipe: Any
) -> dict[str, Any]:
    """One transformer's part of the configuration: what it was searched on, its modes, densities and errors."""
    finished, stats, layout = state["finished"].get(name, {}), state["stats"].get(name, {}), method.layout
    layers = {k: finished[k] for k in sorted(finished, key=int)}
    densities = {}
    if layout is not None:
        geo = {k: v for k, v in geometry.items() if k != "block_size"}
        densities = {k: modes_density(v, layout, geometry["block_size"], **geo) for k, v in layers.items()}
    return {
        "model": {
            "class": type(model).__name__,
            "pipeline": type(pipe).__name__,
            "fingerprint": config_fingerprint(model),
        },
        "heads": method.heads,
        "num_layers": num_layers,
        "layout": None if layout is None else layout_record(layout),
        "layers": layers,
        "density": densities,
        "errors": {k: head_errors(stats[k], v) for k, v in layers.items() if k in stats},
    }


def _document(
    state: dict[str, Any], settings: SearchSettings, searched: Searched, geometry: dict, pipe: Any, complete: bool
) -> dict[str, Any]:
    sections = {name: _section(name, model, method, n, state, geometry, pipe) for name, model, method, n in searched}
    body = sections["transformer"] if list(sections) == ["transformer"] else {"transformers": sections}
    return {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "complete": complete,
        **body,
        "params": geometry,
        "cost_model": state.get("cost"),
        "search": {
            "selection": settings.selection,
            "lambda": settings.lam,
            "epsilon": settings.eps,
            "error_budget": settings.error_budget,
            "feed": settings.feed,
            "candidates": list(settings.candidates),
            "modes": list(MODES),
            "state": state,
        },
    }
