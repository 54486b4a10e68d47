"""SparseProcessor: wraps a model's own attention processor and reroutes only its self-attention SDPA call.

The native processor runs unchanged (projections, norms, RoPE, output projection stay the model's own); a
``TorchFunctionMode`` active only during that call catches ``F.scaled_dot_product_attention`` (q, k, v in
``[B, H, N, D]``, as both direct callers and Diffusers' SDPA-based backends pass them). A self-attention call over the
transformer's video (+ joint text) tokens goes to the method and the block-sparse kernel; anything else (cross-attention,
short text attention) passes through. Dense warm-up steps, dense layers and short sequences are decided here, once.

``torch.compile``: apply first, then compile. Regional compilation (``transformer.compile_repeated_blocks()`` where the
model defines ``_repeated_blocks``, or ``block.compile()`` on each transformer block) and ``torch.compile(transformer)``
both work: Dynamo traces the native processor (projections, norms, RoPE are compiled) and the interception; the
self-attention call becomes the custom op ``dit_sparse::attend`` (:mod:`dit_sparse.graph`), whose real implementation
runs :meth:`SparseProcessor.attention` at run time (the method, the kernel, the per-step state): no graph break,
``fullgraph=True`` works. Nothing per-step is read in traced code, so steps never recompile. With gradients flowing
the call stays a graph break that runs eagerly (:func:`_attend_eager`). With ``torch.compile`` of the whole transformer the Diffusers way (``set_attn_processor``) needs
``dit_sparse.apply`` or one eager forward first (the first-sighting hooks of :mod:`dit_sparse.finder` are not traced).
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from dataclasses import dataclass
from types import FunctionType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dit_sparse import graph
from dit_sparse.finder import FINDER
from dit_sparse.kernels.api import BACKENDS, block_sparse_attention
from dit_sparse.layout import TokenLayout
from dit_sparse.methods import MethodConfig, get_method
from dit_sparse.parallel import UlyssesHeads, ulysses_heads
from dit_sparse.plan import BlockPlan
from dit_sparse.state import SITE_ATTR, Frame, LayerStats, Site, StepContext, in_backward
from dit_sparse.timing import Timer

DEFAULT_METHOD = "radial"
"""The method ``SparseProcessor()`` and ``dit_sparse.apply(pipe)`` use when none is named."""

# Union of the native processors' parameters (Wan, CogVideoX, HunyuanVideo, LTX, Mochi, AttnProcessor2_0): legacy
# ``Attention`` and ``LTXAttention`` drop every keyword the processor's signature does not name (RoPE included).
_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("attn", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("hidden_states", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
            for name in ("encoder_hidden_states", "attention_mask", "image_rotary_emb", "rotary_emb", "temb")
        ),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


def _sdpa_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple:
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


@functools.cache
def _accepted(cls: type) -> frozenset[str] | None:
    """Keyword names ``cls.__call__`` accepts (None: any, it takes ``**kwargs``)."""
    params = inspect.signature(cls.__call__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


BINDING_ATTR = "_dit_sparse_binding"
"""Attribute of an attention module holding its :class:`_Binding` (what traced code reads under ``torch.compile``)."""


@dataclass(frozen=True)
class _Binding:
    """What compiled code needs of one attention module, the same for every block (no per-layer values: one graph
    serves all blocks): its own processor, the keywords that processor accepts, and whether it is self-attention."""

    native: Any
    accepted: frozenset[str] | None
    self_attention: bool


def _set_binding(module: nn.Module, native: Any, self_attention: bool) -> None:
    binding = module.__dict__.get(BINDING_ATTR)
    if binding is None or binding.native is not native or binding.self_attention != self_attention:
        module.__dict__[BINDING_ATTR] = _Binding(native, _accepted(type(native)), self_attention)


def clear_binding(module: nn.Module) -> None:
    """Forget ``module``'s binding (``dit_sparse.remove``)."""
    module.__dict__.pop(BINDING_ATTR, None)


class SparseProcessor:
    """Attention processor that makes a video transformer's self-attention block-sparse.

    One instance may serve every attention module (``transformer.set_attn_processor(SparseProcessor("window"))``):
    its state is keyed by the module it is called with. Cross-attention and text-only attention pass through.

    Args:
        method: registered method name (``dit_sparse.available_methods()``), or a method's config
            (``RadialConfig(decay=0.2)``); default :data:`DEFAULT_METHOD`.
        backend: kernel backend, ``auto`` / ``triton`` / ``flex`` / ``reference``.
        error_sample: every n-th self-attention layer also runs exact attention and records the relative L2 error
            of the output and the LSE (0: off).
        **params: the method's hyper-parameters (its config dataclass; policy fields ``block_size``,
            ``dense_steps``, ``dense_layers``, ``min_seq_len`` included).

    Under ``torch.compile`` (apply, then ``transformer.compile_repeated_blocks()``, ``block.compile()`` per block, or
    ``torch.compile(transformer)``) the native processor is traced and compiled; the self-attention call is the
    custom op ``dit_sparse::attend`` (no graph break); no recompilation per step or per block.

    Models without an adapter (Diffusers or not) whose self-attention calls ``F.scaled_dot_product_attention``:
    ``dit_sparse.apply(model, method, layout=TokenLayout(...))`` (or ``layout=`` a function of the forward's inputs
    returning one; ``attention=`` a regex naming the self-attention modules). No processor is set then: the same
    routing runs from forward hooks on those modules (:class:`ModuleRouter`, :mod:`dit_sparse.pipelines.declared`).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(
        self,
        method: str | MethodConfig = DEFAULT_METHOD,
        *,
        backend: str = "auto",
        error_sample: int = 0,
        **params: Any,
    ) -> None:
        self._setup(method, backend, error_sample, params)
        FINDER.wait(self)  # the Diffusers way: find the transformer at its first forward (dit_sparse.finder)

    @classmethod
    def for_tracked(
        cls, method: str | MethodConfig, backend: str = "auto", error_sample: int = 0, **params: Any
    ) -> SparseProcessor:
        """A processor for a transformer dit_sparse already tracks (``dit_sparse.apply``): it waits for nothing."""
        processor = cls.__new__(cls)
        processor._setup(method, backend, error_sample, params)
        return processor

    def _setup(self, method: str | MethodConfig, backend: str, error_sample: int, params: dict[str, Any]) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if isinstance(error_sample, bool) or not isinstance(error_sample, int) or error_sample < 0:
            raise ValueError(f"error_sample must be an int >= 0 (0 = off), got {error_sample!r}")
        self.method = get_method(method, **params)
        self.backend = backend
        self.error_sample = error_sample
        self._natives: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
        self._full_plans: dict[tuple, BlockPlan] = {}
        self._ulysses: weakref.WeakKeyDictionary[Any, UlyssesHeads] = weakref.WeakKeyDictionary()  # per tracker

    def __repr__(self) -> str:
        return f"SparseProcessor({self.method!r}, backend={self.backend!r})"

    # ---------------------------------------------------------------- wrapped processors
    def bind(self, module: nn.Module, native: Any, self_attention: bool = True) -> None:
        """Use ``native`` (the module's own processor object) for ``module``."""
        self._natives[module] = native
        _set_binding(module, native, self_attention)

    def native_of(self, module: nn.Module) -> Any | None:
        return self._natives.get(module)

    def _native(self, module: nn.Module, name: str, adapter: Any, self_attention: bool) -> Any:
        native = self._natives.get(module)
        if native is None:
            native = self._natives[module] = adapter.native_processor(name, module)
        for attr in ("_attention_backend", "_parallel_config"):
            if attr in self.__dict__ and hasattr(native, attr):
                setattr(native, attr, self.__dict__[attr])
        _set_binding(module, native, self_attention)
        return native

    # ---------------------------------------------------------------- the call
    def __call__(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self._traced_call(attn, args, kwargs)
        frame, name, index = _frame_of(attn)
        native = self._native(attn, name, frame.tracker.adapter, index is not None)
        accepted = _accepted(type(native))
        if accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if index is None:
            return native(attn, *args, **kwargs)
        router = _SDPARouter(self, frame, name, index)
        with router:
            out = native(attn, *args, **kwargs)
        if router.seen == 0:
            raise RuntimeError(self._no_sdpa_message(name, native))
        return out

    def _traced_call(self, attn: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``__call__`` as Dynamo traces it: only per-module constants (the binding), the step lives in the eager part."""
        binding = attn.__dict__.get(BINDING_ATTR)
        if binding is None:  # the Diffusers way, first call: bind eagerly (one graph break, one recompile)
            binding = _bind_eager(self, attn)
        if binding.accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in binding.accepted}
        if not binding.self_attention:
            return binding.native(attn, *args, **kwargs)
        router = _CompiledRouter(self, attn)
        with router:
            out = binding.native(attn, *args, **kwargs)
        if not router.seen:  # known while tracing: a pinned non-SDPA backend
            _no_sdpa_eager(self, attn, binding.native)
        return out

    @staticmethod
    def _no_sdpa_message(name: str, native: Any) -> str:
        backend = getattr(native, "_attention_backend", None)
        if backend is None:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry._active_backend
        backend = getattr(backend, "value", backend)
        return (
            f"dit_sparse: self-attention module {name!r} made no torch scaled_dot_product_attention call: its "
            f"Diffusers attention backend is {backend!r} (pinned with set_attention_backend(...), the "
            "attention_backend(...) context or DIFFUSERS_ATTN_BACKEND). dit_sparse reroutes SDPA-based backends only: "
            "use transformer.set_attention_backend('native') (or another _native_* backend) while dit_sparse is applied"
        )

    # ---------------------------------------------------------------- one SDPA call
    def attention(self, router: _SDPARouter | _Route, func: Any, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Route one SDPA call of a self-attention module: sparse path, dense policy, or pass-through."""
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_args(*args, **kwargs)
        frame = router.frame
        if q.dim() != 4 or k.dim() != 4 or q.shape[-2] != k.shape[-2]:
            return func(*args, **kwargs)
        layout = frame.layout_for(q.shape[0], q.shape[-2])
        if layout is None:
            lay = frame.layout
            raise RuntimeError(
                f"dit_sparse: self-attention {router.layer!r} attends {q.shape[-2]} tokens but the "
                f"{frame.tracker.adapter.family} layout of this forward has {lay.video_len} video tokens "
                f"(grid {lay.grid}) and {lay.text_len} text tokens; {frame.tracker.adapter.layout_help}"
            )
        tracker = frame.tracker
        record = tracker.active  # not gradient checkpointing's re-run in backward
        stats = tracker.stats.layer(router.layer) if record else LayerStats()
        start = Timer.start(q.device)
        kv_len = self._extras(router.layer, tracker.adapter, q, k, mask, dropout_p, is_causal, enable_gqa)
        method, cfg = self.method, self.method.config
        if not record and method.stateful:
            raise NotImplementedError(
                f"dit_sparse: {method.name} keeps per-step state, which gradient checkpointing's re-run of "
                f"{router.layer!r} in backward would change; train with a static method (dense, radial, window, "
                "svdit) or without gradient checkpointing"
            )
        if method.name not in tracker.stats.methods:
            tracker.stats.methods[method.name] = method.describe()
        step, index = frame.step, router.index
        dense_steps = cfg.warmup_steps(frame.num_steps)
        dense = method.name != "dense" and (
            step < dense_steps or index < cfg.dense_layers or layout.seq_len < cfg.min_seq_len
        )
        if dense:
            out = func(*args, **kwargs)
            stats.dense_calls += 1
        else:
            ctx = StepContext(
                step, frame.timestep, frame.cfg_pass, router.layer, index, layout,
                tracker.state.layer_cache(router.layer, frame.cfg_pass), tracker.component, frame.num_steps,
                dense_steps, *self._heads(tracker, q.shape[1]),
            )  # fmt: skip
            out, lse = self._sparse(q, k, v, layout, ctx, scale, kv_len, stats)
            stats.sparse_calls += 1
        stats.calls += 1
        stats.timer.stop(start)
        if record and not dense and self.error_sample > 0 and index % self.error_sample == 0:
            self._record_error(q, k, v, out, lse, scale, kv_len, stats)  # measured outside attention_ms
        return out

    def _heads(self, tracker: Any, local_heads: int) -> tuple[int, int, Any]:
        """The call's (head offset, layer heads, head group) for its :class:`StepContext` (Ulysses context parallelism:
        the rank's slice of the heads; else ``(0, local_heads, None)``).

        Read from the transformer's Diffusers parallel config, the object ``enable_parallelism`` sets on every
        attention processor (the native ones included), once per transformer: Diffusers enables parallelism once.
        """
        heads = self._ulysses.get(tracker)
        if heads is None:
            heads = ulysses_heads(getattr(tracker.model, "_parallel_config", None))
            if heads is None:  # not cached: parallelism may be enabled after this call
                return 0, local_heads, None
            self._ulysses[tracker] = heads
        return heads.offset(local_heads), heads.degree * local_heads, heads.group

    def _extras(
        self,
        layer: str,
        adapter: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        enable_gqa: bool,
    ) -> torch.Tensor | None:
        """Check what the SDPA call carries besides q/k/v; the key-padding length when it has a padding mask."""
        if dropout_p > 0.0 or is_causal:
            raise NotImplementedError(
                f"dit_sparse: self-attention {layer!r} asks for dropout_p={dropout_p}, is_causal={is_causal}; sparse "
                "attention supports neither (use the model in eval mode, or dit_sparse.remove it)"
            )
        if enable_gqa and q.shape[1] != k.shape[1]:
            raise NotImplementedError(
                f"dit_sparse: self-attention {layer!r} uses grouped-query attention (unsupported)"
            )
        if mask is None:
            return None
        b, n = q.shape[0], q.shape[-2]
        if (
            adapter.pairwise_padding_mask
            and mask.dtype == torch.bool
            and mask.dim() == 4
            and mask.shape[1:] == (1, n, n)
        ):
            mask = mask[:, :, :1, :]  # its first row: a video query's, always valid, is the key-padding mask
        if (
            (adapter.key_padding_mask or adapter.pairwise_padding_mask)
            and mask.dtype == torch.bool
            and mask.dim() == 4
            and mask.shape[1:] == (1, 1, n)
            and mask.shape[0] in (1, b)
        ):
            # the model builds this mask as "key index < video_len + valid text" (HunyuanVideo forward)
            return mask.reshape(mask.shape[0], n).sum(-1, dtype=torch.int32).expand(b).contiguous()
        raise NotImplementedError(
            f"dit_sparse: self-attention {layer!r} got an attention mask of shape {tuple(mask.shape)} and dtype "
            f"{mask.dtype}; only a boolean (B, 1, 1, N) key-padding mask of a padded text suffix is supported "
            f"({adapter.family} passes another kind): run this model without dit_sparse"
        )

    def _sparse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: StepContext,
        scale: float | None,
        kv_len: torch.Tensor | None,
        stats: LayerStats,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The method's output, and its LSE when errors are sampled and one kernel call covered every head.

        A method may launch the kernel several times per call (svdit: one launch per group of heads sharing a
        token order): the recorded density is the head-weighted sum of the launches' plan densities. Launches a
        method marks ``aux_work=True`` (work besides the output, e.g. Re-ttention's statistics on a refresh step)
        are counted on their own (the report's ``aux_density``), so density stays a fraction of dense work.
        """
        sample = self.error_sample > 0 and ctx.layer_index % self.error_sample == 0
        heads = q.shape[1]
        density: list[torch.Tensor] = []
        aux: list[torch.Tensor] = []
        lse_all: list[torch.Tensor] = []
        backend = self.backend

        def kernel(q_, k_, v_, plan: BlockPlan, return_lse: bool = False, *, aux_work: bool = False):
            want = return_lse or (sample and not aux_work)
            res = block_sparse_attention(q_, k_, v_, plan, scale=scale, return_lse=want, backend=backend, kv_len=kv_len,
                                         precision=self.method.config.precision)  # fmt: skip
            out, lse = res if want else (res, None)
            (aux if aux_work else density).append(plan.density_tensor() * (q_.shape[1] / heads))
            if lse is not None and not aux_work and q_.shape[1] == heads:
                lse_all.append(lse)
            return out, (lse if return_lse else None)

        out = self.method.attend(q, k, v, layout, ctx, kernel)
        tokens = q.shape[0] * q.shape[-2]
        if density:
            stats.density_sum = stats.density_sum + sum(density) * tokens
            stats.tokens += tokens
        if aux:
            stats.aux_sum = stats.aux_sum + sum(aux) * tokens
        return out, (lse_all[-1] if len(lse_all) == 1 and len(density) == 1 else None)

    def _record_error(self, q, k, v, out, lse, scale, kv_len, stats: LayerStats) -> None:
        """Relative L2 error of the output and the LSE against exact attention (same backend, full plan)."""
        n, block = q.shape[-2], self.method.config.block_size
        key = (n, block, q.device)
        full = self._full_plans.get(key)
        if full is None:
            full = self._full_plans[key] = BlockPlan.full(n, block, device=q.device)
        ref, ref_lse = block_sparse_attention(
            q, k, v, full, scale=scale, return_lse=True, backend=self.backend, kv_len=kv_len
        )
        ref32, out, ref_lse = ref.detach().float(), out.detach(), ref_lse.detach()
        stats.out_err.append((out.float() - ref32).norm() / ref32.norm().clamp_min(1e-30))
        if lse is not None:
            lse = lse.detach()
            ok = torch.isfinite(lse) & torch.isfinite(ref_lse)
            diff = torch.where(ok, lse - ref_lse, 0.0)
            stats.lse_err.append(diff.norm() / torch.where(ok, ref_lse, 0.0).norm().clamp_min(1e-30))


# inspect.signature(processor.__call__) -> the union of the native processors' parameters (see _SIGNATURE)
SparseProcessor.__call__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *_SIGNATURE.parameters.values()]
)


class _SDPARouter(TorchFunctionMode):
    """Active only while a native processor runs: hands its SDPA calls to :meth:`SparseProcessor.attention`."""

    def __init__(self, processor: SparseProcessor, frame: Frame, layer: str, index: int) -> None:
        super().__init__()
        self.processor, self.frame, self.layer, self.index = processor, frame, layer, index
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.seen += 1
        return self.processor.attention(self, func, args, kwargs)


class ModuleRouter:
    """Routes one module's SDPA calls through a processor with forward pre/post hooks, for self-attention modules
    that have no attention processor (models given a declared layout: :mod:`dit_sparse.pipelines.declared`).

    The pre-hook enters the same :class:`_SDPARouter` that :meth:`SparseProcessor.__call__` enters around a native
    processor; the post-hook (run even when the forward raises) leaves it. Eager only. :meth:`remove` takes the hooks
    off again (the module is then exactly what it was).
    """

    def __init__(self, processor: SparseProcessor, module: nn.Module) -> None:
        self.processor = processor
        self._routers: list[_SDPARouter] = []
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._leave, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "dit_sparse: torch.compile of a model given apply(..., layout=) is not supported; run it eagerly"
            )
        frame, name, index = _frame_of(module)
        router = _SDPARouter(self.processor, frame, name, index)
        router.__enter__()
        self._routers.append(router)

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._routers:  # the pre-hook raised
            return
        router = self._routers.pop()
        router.__exit__(None, None, None)
        if router.seen == 0 and sys.exc_info()[1] is None:
            raise RuntimeError(
                f"dit_sparse: module {router.layer!r} ({type(module).__name__}) made no "
                "torch.nn.functional.scaled_dot_product_attention call in its forward; name the modules whose "
                "forward calls it for their self-attention with dit_sparse.apply(..., attention=regex)"
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class _Route:
    """Which self-attention call :meth:`SparseProcessor.attention` routes (the eager half of a compiled call)."""

    frame: Frame
    layer: str
    index: int


def _frame_of(attn: nn.Module, compiled: bool = False) -> tuple[Frame, str, int | None]:
    """(frame, layer name, self-attention index) of the transformer forward running ``attn``; a clear error outside
    any (the frame of the last forward serves gradient checkpointing's re-run in backward)."""
    site = attn.__dict__.get(SITE_ATTR)
    return _frame_at(site, type(attn).__name__, compiled), site.name, site.index


def _frame_at(site: Site | None, module_type: str, compiled: bool = False) -> Frame:
    tracker = site.tracker_ref() if site is not None else None
    if tracker is not None and tracker.frame is not None and (tracker.active or in_backward()):
        return tracker.frame
    from dit_sparse.pipelines import supported_models

    hint = ""
    if compiled:
        hint = (
            " (under torch.compile of a whole transformer that was given a SparseProcessor the Diffusers way, "
            "call dit_sparse.apply(...) or run one eager forward before compiling)"
        )
    elif tracker is None and site is None:
        hint = " (if it is one: dit_sparse.apply(pipe_or_transformer, ...) tracks it without the Diffusers way)"
    raise TypeError(
        f"SparseProcessor was called for a {module_type} outside the forward of a supported "
        f"transformer; supported transformers: {', '.join(supported_models())}{hint}"
    )


def route_call(site: Site, func: Any, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one self-attention SDPA call of the module at ``site`` through its tracker's processor, at run time
    (the real implementation of the ``dit_sparse::attend`` op of compiled graphs, :mod:`dit_sparse.graph`)."""
    frame = _frame_at(site, "self-attention module", compiled=True)
    processor = frame.tracker.processor
    return processor.attention(_Route(frame, site.name, site.index), func, args, kwargs)


@torch.compiler.disable
def _bind_eager(processor: SparseProcessor, attn: nn.Module) -> _Binding:
    """Bind ``attn``'s native processor outside the graph (first compiled call of a module set the Diffusers way)."""
    frame, name, index = _frame_of(attn, compiled=True)
    processor._native(attn, name, frame.tracker.adapter, index is not None)
    return attn.__dict__[BINDING_ATTR]


@torch.compiler.disable
def _no_sdpa_eager(processor: SparseProcessor, attn: nn.Module, native: Any) -> None:
    _, name, _ = _frame_of(attn, compiled=True)
    raise RuntimeError(processor._no_sdpa_message(name, native))


@torch.compiler.disable
def _attend_eager(processor: SparseProcessor, attn: nn.Module, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """The graph break of a compiled self-attention call: the current frame (step, layout, CFG pass) is read here, at
    run time, and the call goes through :meth:`SparseProcessor.attention` as in eager mode."""
    frame, name, index = _frame_of(attn, compiled=True)
    if index is None:
        return func(*args, **kwargs)
    return processor.attention(_Route(frame, name, index), func, args, kwargs)


class _CompiledRouter(TorchFunctionMode):
    """The router Dynamo traces: hands the native processor's SDPA calls to the ``dit_sparse::attend`` op
    (:mod:`dit_sparse.graph`, no graph break), or to :func:`_attend_eager` (a graph break) when gradients flow."""

    def __init__(self, processor: SparseProcessor, attn: nn.Module) -> None:
        super().__init__()
        self.processor, self.attn = processor, attn
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.seen = True
            site = self.attn.__dict__.get(SITE_ATTR)
            q, k, v = _sdpa_args(*args, **kwargs)[:3]
            if site is not None and site.key is not None and graph.traceable(q, k, v):  # no int read: no guard
                tracker = site.tracker_ref()
                return graph.attend(site, args, kwargs, None if tracker is None else tracker.token)
            return _attend_eager(self.processor, self.attn, func, args, kwargs)
        if isinstance(func, FunctionType) and args and isinstance(args[0], torch.Tensor):
            # Tensor methods written in Python (unflatten, __rsub__, ...): Dynamo cannot trace their body under a mode
            # (super().unflatten), it traces the method call itself
            name = func.__name__
            if getattr(torch.Tensor, name, None) is func:
                return getattr(args[0], name)(*args[1:], **kwargs)
        return func(*args, **kwargs)
