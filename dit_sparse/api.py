"""The one-line API: ``apply`` / ``remove`` / ``report`` on a Diffusers pipeline or its transformer."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dit_sparse.pipelines import adapter_for, find_adapter
from dit_sparse.processor import DEFAULT_METHOD, SparseProcessor, clear_binding
from dit_sparse.state import GlobalHooks, Tracker, TransformerStats, get_tracker

_TRANSFORMER_ATTRS = ("transformer", "transformer_2")


@dataclass
class _Applied:
    processor: SparseProcessor
    originals: dict[nn.Module, Any]


_APPLIED: weakref.WeakKeyDictionary[nn.Module, _Applied] = weakref.WeakKeyDictionary()


def _transformers(obj: Any) -> list[tuple[str, nn.Module]]:
    """(prefix for layer names, transformer) pairs of a pipeline (``transformer``, ``transformer_2``) or a model."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    found = [(attr, getattr(obj, attr, None)) for attr in _TRANSFORMER_ATTRS]
    found = [(attr, m) for attr, m in found if isinstance(m, nn.Module)]
    if not found:
        raise TypeError(f"{type(obj).__name__} is neither a transformer nor a pipeline with a `transformer` component")
    if len(found) == 1:
        return [("", found[0][1])]
    return [(f"{attr}.", m) for attr, m in found]


def apply(
    pipe_or_transformer: Any,
    method: str = DEFAULT_METHOD,
    *,
    backend: str = "auto",
    error_sample: int = 0,
    **params: Any,
) -> Any:
    """Make the self-attention of a pipeline's transformer(s) (or of one transformer) sparse; returns its argument.

    Args:
        pipe_or_transformer: a Diffusers pipeline (its ``transformer`` and ``transformer_2``) or a transformer.
        method: a registered method name (``dit_sparse.available_methods()``).
        backend: kernel backend (``auto``, ``triton``, ``flex``, ``reference``).
        error_sample: every n-th self-attention layer also runs exact attention and records the error (0: off).
        **params: the method's hyper-parameters.

    Applying again replaces the previous application (the originals stay the model's own processors).

    ``torch.compile``: apply, then compile (``transformer.compile_repeated_blocks()``, ``block.compile()`` per block, or
    ``torch.compile(transformer)``); each self-attention call is a graph break that runs the method eagerly, nothing
    recompiles per step (see :mod:`dit_sparse.processor`).
    """
    models = _transformers(pipe_or_transformer)
    adapters = [adapter_for(model) for _, model in models]  # unsupported class: error before any change
    processor = SparseProcessor(method, backend=backend, error_sample=error_sample, **params)
    for (_, model), adapter in zip(models, adapters, strict=True):
        if model in _APPLIED:
            _remove_one(model)
        modules = adapter.self_attention_modules(model)
        if not modules:
            raise ValueError(f"found no self-attention module in this {type(model).__name__}")
        Tracker.attach(model, adapter)
        originals: dict[nn.Module, Any] = {}
        for name, module in modules:
            original = module.processor
            native = original.native_of(module) if isinstance(original, SparseProcessor) else original
            processor.bind(module, native if native is not None else adapter.native_processor(name, module))
            originals[module] = original
            adapter.set_processor(module, processor)
        _APPLIED[model] = _Applied(processor, originals)
    return pipe_or_transformer


def _remove_one(model: nn.Module) -> None:
    applied = _APPLIED.pop(model, None)
    adapter = find_adapter(model)
    if applied is not None:
        for module, original in applied.originals.items():
            adapter.set_processor(module, original)
            clear_binding(module)
    # processors set the Diffusers way (set_attn_processor(SparseProcessor(...))): back to native ones
    if adapter is not None:
        for name, module in adapter.attention_modules(model):
            proc = module.processor
            if isinstance(proc, SparseProcessor):
                native = proc.native_of(module)
                adapter.set_processor(module, native if native is not None else adapter.native_processor(name, module))
            clear_binding(module)
    tracker = get_tracker(model)
    if tracker is not None:
        tracker.detach()


def remove(pipe_or_transformer: Any) -> Any:
    """Undo :func:`apply`: the original processor objects are back and the hooks are gone (bit-exact outputs)."""
    for _, model in _transformers(pipe_or_transformer):
        _remove_one(model)
    GlobalHooks.sweep()  # the global first-sighting hooks, if no SparseProcessor is left
    return pipe_or_transformer


@dataclass
class SparseReport:
    """What the sparse attention did since it was applied (or since the last ``report(..., reset=True)``).

    Attributes:
        method, params: the method's name and hyper-parameters.
        calls: self-attention calls seen (``sparse_calls + dense_calls``).
        sparse_calls: calls through the method and the block-sparse kernel.
        dense_calls: calls left to the model's own SDPA by policy (dense steps / layers, short sequences).
        density: token-weighted mean fraction of the attention matrix computed over the sparse calls.
        steps: denoising steps seen (summed over generations and transformers).
        cfg_passes: CFG pass names seen (``cond``, ``uncond``, ``cond_uncond``, ``pass<i>``).
        attention_ms: total time in self-attention calls (CUDA events on GPU, wall clock on CPU).
        transformer_ms: time of each transformer forward.
        per_layer: per self-attention layer: ``density``, ``calls``, ``sparse_calls``, ``dense_calls``,
            ``attention_ms`` and, when measured, ``out_rel_l2`` / ``lse_rel_l2``.
        attn_error: mean relative L2 error of the output and the LSE over sampled calls (empty: not measured).
        generations: generations (pipeline calls) seen.
    """

    method: str
    params: dict[str, Any]
    calls: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    density: float = 1.0
    steps: int = 0
    cfg_passes: list[str] = field(default_factory=list)
    attention_ms: float = 0.0
    transformer_ms: list[float] = field(default_factory=list)
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    attn_error: dict[str, float] = field(default_factory=dict)
    generations: int = 0

    @property
    def effective_density(self) -> float:
        """Fraction of dense self-attention work done over every call, dense-by-policy calls counting 1."""
        if not self.calls:
            return 1.0
        return (self.density * self.sparse_calls + self.dense_calls) / self.calls

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        fwd = sum(self.transformer_ms)
        lines = [
            f"dit_sparse {self.method}({params})",
            f"  calls {self.calls} (sparse {self.sparse_calls}, dense {self.dense_calls}), density {self.density:.3f}, "
            f"steps {self.steps}, generations {self.generations}, cfg passes {', '.join(self.cfg_passes) or '-'}",
            f"  attention {self.attention_ms:.1f} ms of {fwd:.1f} ms in {len(self.transformer_ms)} transformer forwards",
        ]
        if self.attn_error:
            lines.append(
                f"  error vs dense: out rel-L2 {self.attn_error['out_rel_l2']:.2e}, "
                f"LSE rel-L2 {self.attn_error.get('lse_rel_l2', float('nan')):.2e}"
            )
        if self.per_layer:
            width = max(len("layer"), *(len(n) for n in self.per_layer))
            lines.append(f"  {'layer':<{width}}  calls  density  attn ms  out err")
            for name, row in self.per_layer.items():
                err = f"{row['out_rel_l2']:.1e}" if "out_rel_l2" in row else "-"
                lines.append(
                    f"  {name:<{width}}  {row['calls']:>5}  {row['density']:>7.3f}  {row['attention_ms']:>7.1f}  {err:>7}"
                )
        return "\n".join(lines)


def report(pipe_or_transformer: Any, reset: bool = False) -> SparseReport:
    """Statistics of the sparse attention of a pipeline or transformer; ``reset=True`` starts the counters anew."""
    trackers = []
    for prefix, model in _transformers(pipe_or_transformer):
        tracker = get_tracker(model)
        if tracker is not None:
            trackers.append((prefix, model, tracker))
    if not trackers:
        raise RuntimeError(
            "dit_sparse is not active on this object: call dit_sparse.apply(...) (or set a SparseProcessor and run "
            "the transformer once) before dit_sparse.report(...)"
        )
    method, params = "", {}
    for _, model, tracker in trackers:
        if tracker.stats.methods:
            method, params = next(iter(tracker.stats.methods.items()))
            break
        if model in _APPLIED:
            described = _APPLIED[model].processor.method.describe()
            method, params = described["method"], described
            break
    params = {k: v for k, v in params.items() if k != "method"}
    if len({m for _, _, t in trackers for m in t.stats.methods}) > 1:
        method = "+".join(sorted({m for _, _, t in trackers for m in t.stats.methods}))
    rep = SparseReport(method=method, params=params)
    dens_sum, dens_tokens, out_errs, lse_errs = 0.0, 0, [], []
    for prefix, _, tracker in trackers:
        stats = tracker.stats
        rep.steps += stats.steps
        rep.generations += stats.generations
        rep.cfg_passes += [p for p in stats.passes if p not in rep.cfg_passes]
        rep.transformer_ms += stats.forward_timer.values()
        for name, layer in stats.layers.items():
            ms = layer.timer.total()
            density = float(layer.density_sum) / layer.tokens if layer.tokens else 1.0
            row: dict[str, Any] = {
                "density": density,
                "calls": layer.calls,
                "sparse_calls": layer.sparse_calls,
                "dense_calls": layer.dense_calls,
                "attention_ms": ms,
            }
            if layer.out_err:
                row["out_rel_l2"] = float(sum(float(e) for e in layer.out_err) / len(layer.out_err))
                out_errs += [float(e) for e in layer.out_err]
            if layer.lse_err:
                row["lse_rel_l2"] = float(sum(float(e) for e in layer.lse_err) / len(layer.lse_err))
                lse_errs += [float(e) for e in layer.lse_err]
            rep.per_layer[prefix + name] = row
            rep.calls += layer.calls
            rep.sparse_calls += layer.sparse_calls
            rep.dense_calls += layer.dense_calls
            rep.attention_ms += ms
            if layer.tokens:
                dens_sum += float(layer.density_sum)
                dens_tokens += layer.tokens
        if reset:
            tracker.stats = dataclasses.replace(TransformerStats(), methods=dict(stats.methods))
    rep.density = dens_sum / dens_tokens if dens_tokens else 1.0
    if out_errs:
        rep.attn_error["out_rel_l2"] = sum(out_errs) / len(out_errs)
    if lse_errs:
        rep.attn_error["lse_rel_l2"] = sum(lse_errs) / len(lse_errs)
    return rep
