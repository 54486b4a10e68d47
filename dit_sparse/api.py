"""The one-line API: ``apply`` / ``remove`` / ``report`` on a Diffusers pipeline or its transformer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dit_sparse.finder import FINDER
from dit_sparse.methods import MethodConfig
from dit_sparse.pipelines import (
    DeclaredAdapter,
    LayoutSpec,
    ModelAdapter,
    adapter_for,
    find_adapter,
    pipeline_transformers,
)
from dit_sparse.processor import DEFAULT_METHOD, SparseProcessor, clear_binding
from dit_sparse.state import Tracker, TransformerStats, get_tracker


def _layer_prefixes(obj: Any) -> list[tuple[str, str, nn.Module]]:
    """(component, prefix of its layer names in reports, transformer): no prefix when there is one transformer."""
    found = pipeline_transformers(obj)
    return [(name, f"{name}." if len(found) > 1 else "", model) for name, model in found]


def apply(
    pipe_or_transformer: Any,
    method: str | MethodConfig = DEFAULT_METHOD,
    *,
    layout: LayoutSpec | None = None,
    attention: str | None = None,
    backend: str = "auto",
    error_sample: int = 0,
    **params: Any,
) -> Any:
    """Make the self-attention of a pipeline's transformer(s) (or of one transformer) sparse; returns its argument.

    Args:
        pipe_or_transformer: a Diffusers pipeline (its ``transformer`` and ``transformer_2``) or a transformer.
        method: a registered method name (``dit_sparse.available_methods()``) or a method's config
            (``RadialConfig(decay=0.2)``).
        layout: for any other transformer (Diffusers or not) whose self-attention calls
            ``F.scaled_dot_product_attention``: the declared :class:`~dit_sparse.layout.TokenLayout` of its
            self-attention tokens, or a function of the forward's inputs by name returning one (default None: the
            family adapter of a supported Diffusers class). See :mod:`dit_sparse.pipelines.declared`.
        attention: with ``layout``, a regex (``fullmatch``) naming the self-attention modules; default None: the
            modules whose SDPA calls attend ``layout.seq_len`` queries and keys, found during the first forward.
        backend: kernel backend (``auto``, ``triton``, ``flex``, ``reference``).
        error_sample: every n-th self-attention layer also runs exact attention and records the error (0: off).
        **params: the method's hyper-parameters (with a method name).

    Applying again replaces the previous application (the originals stay the model's own processors). Given a
    pipeline, the dense warm-up follows its scheduler's step count (:class:`~dit_sparse.methods.MethodConfig`).

    ``torch.compile``: apply, then compile (``transformer.compile_repeated_blocks()``, ``block.compile()`` per block, or
    ``torch.compile(transformer)``, ``fullgraph=True`` included); each self-attention call is a custom op that runs the
    method at run time, nothing breaks the graph or recompiles per step (see :mod:`dit_sparse.graph`).
    """
    models = pipeline_transformers(pipe_or_transformer)
    if layout is None and attention is not None:
        raise ValueError("dit_sparse: attention= names the self-attention modules of a declared layout: give layout=")
    # unsupported class without a layout: error before any change
    adapters = [adapter_for(m) if layout is None else DeclaredAdapter(m, layout, attention) for _, m in models]
    processor = SparseProcessor.for_tracked(method, backend=backend, error_sample=error_sample, **params)
    for component, model in models:
        processor.method.check_transformer(component, model)
    pipe = None if isinstance(pipe_or_transformer, nn.Module) else pipe_or_transformer
    for (component, model), adapter in zip(models, adapters, strict=True):
        if get_tracker(model) is not None:
            _remove_one(model)
        adapter.check_modules(model)
        tracker = Tracker.attach(model, adapter, component, pipe)
        tracker.adopt(processor, applied=True, originals=adapter.install(model, processor, tracker))
    return pipe_or_transformer


def _native_for(module: nn.Module, name: str, proc: SparseProcessor, adapter: Any) -> Any:
    """The processor to give back to a module that holds a SparseProcessor set the Diffusers way."""
    native = proc.native_of(module)
    if native is not None:
        return native
    if adapter is not None:
        return adapter.native_processor(name, module)
    cls = getattr(type(module), "_default_processor_cls", None)
    if cls is None:
        raise TypeError(
            f"dit_sparse cannot tell the native processor of {name!r} ({type(module).__name__}); set it back yourself "
            "with set_attn_processor(...)"
        )
    return cls()


def _remove_one(model: nn.Module) -> None:
    tracker = get_tracker(model)
    if tracker is not None:
        tracker.adapter.release(model)
    adapter = find_adapter(model)
    if tracker is not None and tracker.applied:
        for name, original in tracker.originals.items():
            module = model.get_submodule(name)
            ModelAdapter.set_processor(module, original)
            clear_binding(module)
    # processors set the Diffusers way (set_attn_processor(SparseProcessor(...))), also on unsupported models
    for name, module in model.named_modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, SparseProcessor):
            FINDER.stop_waiting(proc)
            ModelAdapter.set_processor(module, _native_for(module, name, proc, adapter))
        clear_binding(module)
    if tracker is not None:
        tracker.detach()


def remove(pipe_or_transformer: Any) -> Any:
    """Undo :func:`apply` (or ``set_attn_processor(SparseProcessor())``): the original processor objects are back
    (the native ones the Diffusers way) and the hooks are gone (bit-exact outputs)."""
    for _, model in pipeline_transformers(pipe_or_transformer):
        _remove_one(model)
    return pipe_or_transformer


@dataclass
class SparseReport:
    """What the sparse attention did since it was applied (or since the last ``report(..., reset=True)``).

    Attributes:
        method, params: the method's name and hyper-parameters.
        calls: self-attention calls seen (``sparse_calls + dense_calls``).
        sparse_calls: calls through the method and the block-sparse kernel.
        dense_calls: calls left to the model's own SDPA by policy (dense steps / layers, short sequences).
        density: token-weighted mean fraction of the attention matrix computed for the sparse calls' outputs (at
            most 1: a fraction of dense work).
        aux_density: work done besides the outputs, in the same unit (Re-ttention's sparse pass on refresh steps,
            whose statistics serve the next steps); 0 for most methods.
        steps: denoising steps seen (summed over generations and transformers).
        cfg_passes: CFG pass names seen (``cond``, ``uncond``, ``cond_uncond``, ``pass<i>``).
        attention_ms: total time in self-attention calls (CUDA events on GPU, wall clock on CPU).
        transformer_ms: time of each transformer forward.
        per_layer: per self-attention layer: ``density``, ``calls``, ``sparse_calls``, ``dense_calls``,
            ``attention_ms`` and, when measured, ``out_rel_l2`` / ``lse_rel_l2``.
        attn_error: mean relative L2 error of the output and the LSE over sampled calls (empty: not measured).
        generations: generations (pipeline calls) seen.
        dense_steps: the dense warm-up steps of the last generation (the method's, scaled to ``num_steps``).
        num_steps: the pipeline's step count in the last generation (None: unknown, the warm-up is unscaled).
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
    aux_density: float = 0.0
    dense_steps: int | None = None
    num_steps: int | None = None

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
        if self.dense_steps is not None:
            of = f"{self.num_steps} steps" if self.num_steps is not None else "an unknown step count: unscaled"
            lines.append(f"  dense warm-up: {self.dense_steps} steps of {of}")
        if self.aux_density:
            lines.append(f"  work besides the outputs (statistics for later steps): +{self.aux_density:.3f} of dense")
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
    trackers = [
        (prefix, tracker)
        for _, prefix, model in _layer_prefixes(pipe_or_transformer)
        if (tracker := get_tracker(model)) is not None
    ]
    if not trackers:
        raise RuntimeError(
            "dit_sparse is not active on this object: call dit_sparse.apply(...) (or set a SparseProcessor and run "
            "the transformer once) before dit_sparse.report(...)"
        )
    methods = {m: d for _, t in trackers for m, d in t.stats.methods.items()}
    if not methods:
        described = next(t.processor.method.describe() for _, t in trackers if t.processor is not None)
        methods = {described["method"]: described}
    method, params = next(iter(methods.items()))
    params = {k: v for k, v in params.items() if k != "method"}
    if len(methods) > 1:
        method = "+".join(sorted(methods))
    rep = SparseReport(method=method, params=params)
    dens_sum, aux_sum, dens_tokens, out_errs, lse_errs = 0.0, 0.0, 0, [], []
    for prefix, tracker in trackers:
        stats = tracker.stats
        rep.steps += stats.steps
        rep.generations += stats.generations
        rep.cfg_passes += [p for p in stats.passes if p not in rep.cfg_passes]
        rep.transformer_ms += stats.forward_timer.values()
        if stats.dense_steps is not None:
            rep.dense_steps, rep.num_steps = stats.dense_steps, stats.num_steps
        for name, layer in stats.layers.items():
            ms = layer.timer.total()
            row: dict[str, Any] = {
                "density": float(layer.density_sum) / layer.tokens if layer.tokens else 1.0,
                "aux_density": float(layer.aux_sum) / layer.tokens if layer.tokens else 0.0,
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
                aux_sum += float(layer.aux_sum)
                dens_tokens += layer.tokens
        if reset:
            tracker.stats = dataclasses.replace(TransformerStats(), methods=dict(stats.methods))
    rep.density = dens_sum / dens_tokens if dens_tokens else 1.0
    rep.aux_density = aux_sum / dens_tokens if dens_tokens else 0.0
    if out_errs:
        rep.attn_error["out_rel_l2"] = sum(out_errs) / len(out_errs)
    if lse_errs:
        rep.attn_error["lse_rel_l2"] = sum(lse_errs) / len(lse_errs)
    return rep
