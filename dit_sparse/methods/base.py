"""Method: a sparse-attention method is a small class that turns (q, k, layout, step context) into a BlockPlan.

Methods register by name (the public API: ``apply(pipe, "radial")``); their hyper-parameters are a frozen dataclass
deriving from :class:`MethodConfig`, whose fields are the policy every method shares and the processor applies
(dense warm-up steps, dense layers, short sequences dense). Static methods' plans depend only on the layout (and
the layer): :meth:`Method.get_plan` builds and checks them once per key and caches them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.plan import BlockPlan
from dit_sparse.registry import Registry
from dit_sparse.state import StepContext, warmup_from_fraction


@dataclass(frozen=True)
class MethodConfig:
    """Policy shared by every method.

    Every field is checked against its annotation when the config is made (an ``int`` field takes no bool, float or
    string; a ``float`` field takes ints, converted, but no infinity or NaN; tuples are checked element by element,
    with their length), so that a bad value is refused up front with the field's name.

    Attributes:
        block_size: query and key block size of the plan in tokens (default 128, the Triton kernel's tile).
        dense_steps: the first ``dense_steps`` denoising steps run dense attention. Default None: the method's paper
            warm-up, ``dense_steps_at_50`` steps of a 50-step schedule scaled to the pipeline's step count (read from
            its scheduler at the first step; exactly the paper's count at 50 steps, unscaled when the step count is
            unknown). An explicit value is taken as it is.
        dense_layers: the first ``dense_layers`` self-attention layers run dense attention (default 0).
        min_seq_len: self-attention over fewer tokens than this runs dense (default 1024).
        precision: the sparse kernel's arithmetic: ``"bf16"`` (default: the inputs' dtype) or ``"fp8"``
            (SageAttention-style FP8 quantization inside the block-sparse kernel: the triton backend on Hopper or
            newer, or the reference backend's emulation; see ``dit_sparse.kernels.quant``).
    """

    dense_steps_at_50: ClassVar[int] = 0
    """The paper's dense warm-up steps for a 50-step schedule (0 here; each method sets its own)."""

    block_size: int = 128
    dense_steps: int | None = None
    dense_layers: int = 0
    min_seq_len: int = 1024
    precision: Literal["bf16", "fp8"] = "bf16"

    def __post_init__(self) -> None:
        check_types(self)
        _at_least(self, "block_size", 1)
        if self.dense_steps is not None:
            _at_least(self, "dense_steps", 0)
        _at_least(self, "dense_layers", 0)
        _at_least(self, "min_seq_len", 0)

    def warmup_steps(self, num_steps: int | None) -> int:
        """Dense warm-up steps on a schedule of ``num_steps`` denoising steps (None: unknown)."""
        if self.dense_steps is not None:
            return self.dense_steps
        return warmup_from_fraction(self.dense_steps_at_50, num_steps)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_types(cfg: Any) -> None:
    """Check (and normalise: int → float, list → tuple) every dataclass field of ``cfg`` against its annotation."""
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        ok, normal = _conform(value, hints[f.name])
        if not ok:
            raise ValueError(
                f"{type(cfg).__name__}.{f.name} must be {_describe(hints[f.name])}, got {value!r} "
                f"({type(value).__name__})"
            )
        if normal is not value:
            object.__setattr__(cfg, f.name, normal)


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value fits the annotation, the value normalised)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is not type(None):
                ok, normal = _conform(value, arg)
                if ok:
                    return True, normal
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False, value
        items = args[:-1] if len(args) == 2 and args[1] is Ellipsis else args
        if items and args[-1] is not Ellipsis and len(value) != len(items):
            return False, value
        elem = [args[0]] * len(value) if args and args[-1] is Ellipsis else items
        out = []
        for item, arg in zip(value, elem, strict=False):
            ok, normal = _conform(item, arg)
            if not ok:
                return False, value
            out.append(normal)
        return True, tuple(out)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False, value
        return True, float(value)
    if hint is str:
        return isinstance(value, str), value
    if hint is Any or not isinstance(hint, type):
        return True, value
    return isinstance(value, hint), value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_describe(args[0])}"
        return f"a tuple of {len(args)} ({', '.join(_describe(a) for a in args)})"
    names = {bool: "a bool (true/false)", int: "an int", float: "a finite number", str: "a string", type(None): "None"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _at_least(cfg: Any, name: str, low: float) -> None:
    value = getattr(cfg, name)
    if value < low:
        raise ValueError(f"{type(cfg).__name__}.{name} must be >= {low}, got {value!r}")


def check_range(cfg: Any, name: str, low: float, high: float) -> None:
    """Raise a ValueError naming the field unless ``low <= cfg.name <= high``."""
    value = getattr(cfg, name)
    if not low <= value <= high:
        raise ValueError(f"{type(cfg).__name__}.{name} must lie in [{low}, {high}], got {value!r}")


# kernel(q, k, v, plan, return_lse, *, aux_work=False) -> (out, lse or None), with the call's scale, backend and key
# padding bound; aux_work=True marks work besides the output (counted on its own in reports, not in the density)
Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


class Method:
    """Base class: subclasses set ``name``, ``config_cls``, ``dynamic`` and implement :meth:`plan`.

    The processor calls :meth:`attend` for every sparse self-attention call; its default is plan → kernel → post.
    Methods that need more than a plan (an offline search comparing candidates, a refresh step that also runs
    dense attention) override :meth:`attend`.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    dynamic: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    """Whether a call's output depends on earlier steps' calls (``ctx.cache``): such methods refuse gradient
    checkpointing's re-run in backward, which would see the state the forward left."""

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"{self.name} takes a {self.config_cls.__name__}, got {type(self.config).__name__}")
        self._static_plans: dict[tuple, BlockPlan] = {}

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        """The BlockPlan for one attention call (q, k: ``[B, H, N, D]``)."""
        raise NotImplementedError

    def check_transformer(self, transformer: str, model: torch.nn.Module) -> None:
        """Refuse a transformer this method's configuration was not made for (a searched Sparse-vDiT file); called
        once per transformer when the method is applied. Default: every transformer fits."""

    def warmup(self, ctx: StepContext) -> int:
        """The dense warm-up steps in force for the call: ``ctx.dense_steps``, else the config's at ``ctx.num_steps``."""
        return ctx.dense_steps if ctx.dense_steps is not None else self.config.warmup_steps(ctx.num_steps)

    def post(self, out: torch.Tensor, lse: torch.Tensor | None, ctx: StepContext) -> torch.Tensor:
        """Correct the sparse output (e.g. Re-ttention's statistical reshape); identity by default."""
        return out

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, ctx: StepContext, kernel: Kernel
    ) -> torch.Tensor:
        """Sparse attention output ``[B, H, N, D]`` for one call: :meth:`get_plan`, the kernel, then :meth:`post`."""
        plan = self.get_plan(q, k, layout, ctx)
        out, lse = kernel(q, k, v, plan, self.needs_lse)
        return self.post(out, lse, ctx)

    @property
    def needs_lse(self) -> bool:
        """Whether :meth:`post` reads the LSE (the kernel then returns it)."""
        return False

    @property
    def cycle_steps(self) -> int:
        """Denoising steps after which the method's per-step cost repeats (1: every step costs the same); benchmarks
        time whole cycles and report the mean step."""
        return 1

    def static_key(self, layout: TokenLayout, heads: int, ctx: StepContext) -> tuple:
        """Cache key of a static plan: the layout (batch excluded) and head count; override to add the layer."""
        return (dataclasses.replace(layout, batch=1), heads)

    def get_plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        """:meth:`plan`, built, checked and cached once per :meth:`static_key` for static methods."""
        if self.dynamic:
            return self.plan(q, k, layout, ctx)
        key = (*self.static_key(layout, q.shape[1], ctx), q.device)
        plan = self._static_plans.get(key)
        if plan is None:
            plan = self.plan(q, k, layout, ctx).check()
            self._static_plans[key] = plan
        return plan

    def full_plan(self, seq_len: int, device: torch.device) -> BlockPlan:
        """The dense plan at this method's block size, cached: for calls that need exact attention with its LSE
        (AdaSpa's first search, Re-ttention's refresh)."""
        key = ("full", seq_len, device)
        plan = self._static_plans.get(key)
        if plan is None:
            plan = self._static_plans[key] = BlockPlan.full(seq_len, self.config.block_size, device=device)
        return plan

    def describe(self) -> dict[str, Any]:
        """Name and hyper-parameters, for reports."""
        return {"method": self.name, **dataclasses.asdict(self.config)}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
        return f"{type(self).__name__}({params})"


METHODS: Registry[type[Method]] = Registry("sparse-attention method", known="methods")
"""The registered methods by name (``dit_sparse.available_methods()``)."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` (``METHODS.register``)."""
    return METHODS.register(cls)


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def make_config(name: str, params: dict[str, Any]) -> MethodConfig:
    """The method's config from keyword parameters, with clear errors for unknown names and bad values."""
    cls = method_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise TypeError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for method {name!r}; "
            f"it takes: {', '.join(sorted(fields))}"
        )
    return cls.config_cls(**params)


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def method_of_config(config: MethodConfig) -> type[Method]:
    """The registered method whose config class ``config`` is."""
    for cls in METHODS:
        if type(config) is cls.config_cls:
            return cls
    raise TypeError(f"{type(config).__name__} is the config of no registered method ({', '.join(available_methods())})")


def get_method(method: str | MethodConfig, **params: Any) -> Method:
    """Instantiate a registered method: ``get_method("window", window=(1, 1, 1))`` or ``get_method(WindowConfig())``."""
    if isinstance(method, MethodConfig):
        if params:
            raise TypeError(
                f"pass hyper-parameters inside the {type(method).__name__}, not beside it: {sorted(params)}"
            )
        return method_of_config(method)(method)
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name or a MethodConfig, got {type(method).__name__}")
    return method_class(method)(make_config(method, params))


def parse_value(text: str) -> Any:
    """A hyper-parameter value from text: ``true``/``false`` (any case), a Python literal (``0.2``, ``1,1,1`` →
    tuple, ``True``, ``None``) or else the string."""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"window:window=1,1,1;tile=2,8,8"`` → ``("window", {"window": (1, 1, 1), "tile": (2, 8, 8)})``, unchecked."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad method setting {item!r} in {spec!r}: write NAME:key=value;key=value")
        params[key.strip()] = parse_value(value.strip())
    return name.strip(), params


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """:func:`split_method_spec`, with the name, the keys and the values checked against the registry."""
    name, params = split_method_spec(spec)
    make_config(name, params)
    return name, params
