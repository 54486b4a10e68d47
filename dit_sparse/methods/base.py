"""Method: a sparse-attention method is a small class that turns (q, k, layout, step context) into a BlockPlan.

Methods register by name (the public API: ``apply(pipe, "radial")``); their hyper-parameters are a frozen dataclass
deriving from :class:`MethodConfig`, whose fields are the policy every method shares and the processor applies
(dense warm-up steps, dense layers, short sequences dense). Static methods' plans depend only on the layout (and
the layer): :meth:`Method.get_plan` builds and checks them once per key and caches them.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.plan import BlockPlan
from dit_sparse.state import StepContext


@dataclass(frozen=True)
class MethodConfig:
    """Policy shared by every method.

    Attributes:
        block_size: query and key block size of the plan in tokens (default 128, the Triton kernel's tile).
        dense_steps: the first ``dense_steps`` denoising steps run dense attention (default 0).
        dense_layers: the first ``dense_layers`` self-attention layers run dense attention (default 0).
        min_seq_len: self-attention over fewer tokens than this runs dense (default 1024).
    """

    block_size: int = 128
    dense_steps: int = 0
    dense_layers: int = 0
    min_seq_len: int = 1024

    def __post_init__(self) -> None:
        _at_least(self, "block_size", 1)
        _at_least(self, "dense_steps", 0)
        _at_least(self, "dense_layers", 0)
        _at_least(self, "min_seq_len", 0)


def _at_least(cfg: Any, name: str, low: float) -> None:
    value = getattr(cfg, name)
    if value < low:
        raise ValueError(f"{type(cfg).__name__}.{name} must be >= {low}, got {value!r}")


def check_range(cfg: Any, name: str, low: float, high: float) -> None:
    """Raise a ValueError naming the field unless ``low <= cfg.name <= high``."""
    value = getattr(cfg, name)
    if not low <= value <= high:
        raise ValueError(f"{type(cfg).__name__}.{name} must lie in [{low}, {high}], got {value!r}")


# kernel(q, k, v, plan, return_lse) -> (out, lse or None), with the call's scale, backend and key padding bound
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BlockPlan, bool], tuple[torch.Tensor, torch.Tensor | None]]


class Method:
    """Base class: subclasses set ``name``, ``config_cls``, ``dynamic`` and implement :meth:`plan`.

    The processor calls :meth:`attend` for every sparse self-attention call; its default is plan → kernel → post.
    Methods that need more than a plan (an offline search comparing candidates, a refresh step that also runs
    dense attention) override :meth:`attend`.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    dynamic: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"{self.name} takes a {self.config_cls.__name__}, got {type(self.config).__name__}")
        self._static_plans: dict[tuple, BlockPlan] = {}

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, ctx: StepContext) -> BlockPlan:
        """The BlockPlan for one attention call (q, k: ``[B, H, N, D]``)."""
        raise NotImplementedError

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


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


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
    if name not in _REGISTRY:
        raise ValueError(f"unknown sparse-attention method {name!r}; known methods: {', '.join(available_methods())}")
    return _REGISTRY[name]


def get_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method: ``get_method("window", window=(1, 1, 1))``."""
    return method_class(name)(make_config(name, params))


def parse_value(text: str) -> Any:
    """A hyper-parameter value from text: a Python literal (``0.2``, ``1,1,1`` → tuple, ``True``) or else the string."""
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
