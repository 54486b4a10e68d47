"""A whole generation composed from a method's schedule: each kind of step timed once, the schedule summed.

A full pipeline call of a large model at 720p does not fit a 10-minute GPU call (Wan2.1-14B: ~8 s per forward, 100
forwards). Its cost is the sum, over the schedule's steps and CFG passes, of one transformer forward in the state
the method is in at that step (dense warm-up, sparse, refresh, search), plus the pipeline's own work between
forwards (scheduler steps, the CFG combination, latent preparation) and the VAE decode. This module finds the
kinds of forward a configuration's schedule contains and times one of each.

Step kinds come from the method's own code, not from a table: :func:`step_kinds` applies the method (through
:func:`dit_sparse.apply`, so the processor's dense policy decides warm-up steps and dense layers) to a tiny
random transformer of the same Diffusers class, drives a whole generation step by step the way the pipeline does
(``cache_context(pass, step_index=i)``, the scheduler's own timesteps, ``num_steps`` read from the scheduler), and
records at every self-attention layer what the method did: which kernel launches (full plan / sparse plan, with
LSE, auxiliary work) and how many torch operations it ran besides them (planning, a search's scoring, the
statistics of a refresh). Forwards whose records are equal are one kind. The second of two generations is used
(steady state: static plans are built once per process). The signature is exact for the work the method does; the
tiny model only has to have the same class (its layers, block sizes and sequence length are small).

:func:`skeleton` picks the first step of each kind; driving only those steps must leave the method in the same
state as the full schedule does (it does for every registered method: their schedules count denoising steps, see
the methods' docstrings). :func:`check_skeleton` verifies it on the tiny model: the skeleton's records must equal
the full run's at the same steps; otherwise the skeleton is every step up to its last one.

:func:`time_kinds` then times the skeleton on the real model (one untimed pass for compilation and autotuning,
``repeats`` timed ones, median per kind) and :func:`compose` sums the schedule.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from dit_sparse.timing import Timer

Signature = tuple  # one forward's record: ((layer index, ((launch, ...), torch ops)), ...) over non-dense layers


@dataclass(frozen=True)
class Schedule:
    """A generation's forwards: ``kinds[step][pass]`` is the kind label of that forward, ``passes`` the CFG passes
    of every step (in the pipeline's order), ``signatures`` the recorded work of each kind."""

    passes: tuple[str, ...]
    kinds: tuple[tuple[str, ...], ...]
    signatures: dict[str, Signature] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.kinds)

    def counts(self) -> dict[str, int]:
        """Forwards of each kind in the whole generation."""
        out: dict[str, int] = {}
        for step in self.kinds:
            for kind in step:
                out[kind] = out.get(kind, 0) + 1
        return out

    def steps_of(self, kind: str) -> list[int]:
        """The steps that have a forward of ``kind``."""
        return [i for i, step in enumerate(self.kinds) if kind in step]


class _OpCounter(TorchFunctionMode):
    """Counts the torch functions called while active and not ``paused``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


class WorkRecorder:
    """Records what a method does at each self-attention call (its instance's ``attend`` wrapped; the processor
    calls it only for calls it does not run dense by policy). ``forward()`` brackets one transformer forward."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self._attend = method.attend
        self._layers: dict[int, tuple] = {}
        method.attend = self._recording_attend

    def close(self) -> None:
        """Give the method its own ``attend`` back."""
        self.method.__dict__.pop("attend", None)

    @contextlib.contextmanager
    def forward(self) -> Iterator[list[Signature]]:
        """Record one forward; the signature is appended to the yielded list when it returns."""
        self._layers = {}
        out: list[Signature] = []
        yield out
        out.append(tuple(sorted(self._layers.items())))

    def _recording_attend(self, q, k, v, layout, ctx, kernel):  # noqa: ANN001, ANN202
        launches: list[tuple[str, bool, bool]] = []
        counter = _OpCounter()

        def recording_kernel(q_, k_, v_, plan, return_lse=False, *, aux_work=False):  # noqa: ANN001, ANN202
            counter.paused = True
            try:
                full = plan is self.method.full_plan(q_.shape[-2], q_.device)
                launches.append(("full" if full else "sparse", bool(return_lse), bool(aux_work)))
                return kernel(q_, k_, v_, plan, return_lse, aux_work=aux_work)
            finally:
                counter.paused = False

        with counter:
            out = self._attend(q, k, v, layout, ctx, recording_kernel)
        self._layers[ctx.layer_index] = self._layers.get(ctx.layer_index, ()) + ((tuple(launches), counter.count),)
        return out


def describe(signature: Signature) -> str:
    """A short label of a forward's work: ``dense`` when every layer ran dense by policy, else the launches of its
    layers (``sparse``, ``full+LSE``, ``sparse+LSE(aux)``) and the torch ops besides them (planning, scoring)."""
    if not signature:
        return "dense"
    parts = []
    for calls in dict.fromkeys(c for _, layer in signature for c in layer):
        launches, ops = calls
        text = (
            ", ".join(kind + ("+LSE" if lse else "") + ("(aux)" if aux else "") for kind, lse, aux in launches)
            or "no launch"
        )
        parts.append(text + (f" + {ops} ops" if ops else ""))
    return " | ".join(parts)


def _label_kinds(records: list[list[Signature]]) -> tuple[tuple[tuple[str, ...], ...], dict[str, Signature]]:
    labels: dict[Signature, str] = {}
    for step in records:
        for sig in step:
            if sig not in labels:
                base = describe(sig)
                taken = set(labels.values())
                label, n = base, 2
                while label in taken:
                    label, n = f"{base} #{n}", n + 1
                labels[sig] = label
    return tuple(tuple(labels[s] for s in step) for step in records), {v: k for k, v in labels.items()}


class _Holder:
    """A transformer and its scheduler, what :func:`dit_sparse.apply` reads of a pipeline."""

    def __init__(self, transformer: Any, scheduler: Any) -> None:
        self.transformer = transformer
        self.scheduler = scheduler


def drive(
    transformer: Any,
    timesteps: Sequence[float],
    steps: Sequence[int],
    passes: Sequence[str],
    inputs: dict[str, Any],
    each: Callable[[int, str], contextlib.AbstractContextManager] | None = None,
) -> None:
    """Run the forwards of ``steps`` (each with every CFG pass) the way the pipeline runs them: inside
    ``transformer.cache_context(pass, step_index=step)`` at that step's timestep; ``each(step, pass)`` is entered
    around every forward (timers, recorders)."""
    device = inputs["hidden_states"].device
    batch = inputs["hidden_states"].shape[0]
    with torch.inference_mode():
        for step in steps:
            t = torch.full((batch,), float(timesteps[step]), device=device)
            for cfg_pass in passes:
                with transformer.cache_context(cfg_pass, step_index=step):
                    with each(step, cfg_pass) if each is not None else contextlib.nullcontext():
                        transformer(**{**inputs, "timestep": t})


def _record(holder: _Holder, steps: Sequence[int], passes: Sequence[str], inputs: dict[str, Any]) -> dict:
    import dit_sparse
    from dit_sparse.state import get_tracker

    tracker = get_tracker(holder.transformer)
    recorder = WorkRecorder(tracker.processor.method)
    found: dict[tuple[int, str], Signature] = {}

    @contextlib.contextmanager
    def each(step: int, cfg_pass: str) -> Iterator[None]:
        with recorder.forward() as sig:
            yield
        found[(step, cfg_pass)] = sig[0]

    try:
        drive(holder.transformer, holder.scheduler.timesteps, steps, passes, inputs, each)
    finally:
        recorder.close()
        dit_sparse.report(holder.transformer, reset=True)
    return found


def step_kinds(
    transformer: Any,
    scheduler: Any,
    inputs: dict[str, Any],
    method: str,
    params: dict[str, Any],
    num_steps: int,
    passes: Sequence[str],
) -> tuple[Schedule, list[int]]:
    """The schedule of ``method`` on ``num_steps`` steps with ``passes`` per step, derived on ``transformer`` (a
    tiny one of the real model's class; ``inputs`` its forward kwargs), and the skeleton steps that reproduce it
    (:func:`check_skeleton`). ``scheduler`` is set to ``num_steps`` (the method's warm-up follows it)."""
    import dit_sparse

    scheduler.set_timesteps(num_steps)
    holder = _Holder(transformer, scheduler)
    dit_sparse.apply(holder, method, **params)
    try:
        every = range(num_steps)
        _record(holder, every, passes, inputs)  # the first generation builds what the method keeps per process
        full = _record(holder, every, passes, inputs)
        kinds, signatures = _label_kinds([[full[(s, p)] for p in passes] for s in every])
        schedule = Schedule(tuple(passes), kinds, signatures)
        steps = skeleton(schedule)
        _record(holder, steps, passes, inputs)
        steps = check_skeleton(full, _record(holder, steps, passes, inputs), steps)
    finally:
        dit_sparse.remove(holder.transformer)
    return schedule, steps


def skeleton(schedule: Schedule) -> list[int]:
    """The first step of each kind, in order."""
    first: dict[str, int] = {}
    for i, step in enumerate(schedule.kinds):
        for kind in step:
            first.setdefault(kind, i)
    return sorted(set(first.values()))


def check_skeleton(full: dict, driven: dict, steps: list[int]) -> list[int]:
    """``steps`` when driving only them gave the same record at each of them as the full schedule; else every step
    up to the last one (the method's state at a step then depends on the steps in between)."""
    if all(driven[key] == full[key] for key in driven):
        return steps
    return list(range(steps[-1] + 1))


def time_kinds(
    transformer: Any,
    timesteps: Sequence[float],
    schedule: Schedule,
    steps: Sequence[int],
    inputs: dict[str, Any],
    repeats: int = 2,
    log: Callable[[str], None] = print,
    first: list[tuple[str, float]] | None = None,
) -> dict[str, float]:
    """Milliseconds of one forward of each kind: ``steps`` driven once untimed (compilation, autotuning, the
    method's per-process plans), then ``repeats`` times timed; the median over every timed forward of a kind.
    ``first`` receives the (kind, ms) of every forward of the untimed pass (see :func:`cold_penalty_s`)."""
    times: dict[str, list[float]] = {}
    for rep in range(repeats + 1):
        timed = _timed_pass(transformer, timesteps, schedule, steps, inputs)
        if rep == 0:
            log(f"   skeleton steps {list(steps)}: untimed pass {sum(ms for _, ms in timed) / 1e3:.1f} s")
            if first is not None:
                first.extend(timed)
            continue
        for kind, ms in timed:
            times.setdefault(kind, []).append(ms)
    return {kind: statistics.median(ms) for kind, ms in times.items()}


def _timed_pass(
    transformer: Any, timesteps: Sequence[float], schedule: Schedule, steps: Sequence[int], inputs: dict[str, Any]
) -> list[tuple[str, float]]:
    """(kind, ms) of every forward of one pass over ``steps``."""
    timer = Timer()
    order: list[str] = []

    @contextlib.contextmanager
    def each(step: int, cfg_pass: str) -> Iterator[None]:
        start = Timer.start(inputs["hidden_states"].device)
        yield
        timer.stop(start)
        order.append(schedule.kinds[step][schedule.passes.index(cfg_pass)])

    drive(transformer, timesteps, steps, schedule.passes, inputs, each)
    return list(zip(order, timer.values(), strict=True))


def compose(schedule: Schedule, kind_ms: dict[str, float], rest_s: float) -> float:
    """Seconds of a whole denoising loop: every forward at its kind's time, plus ``rest_s`` (the pipeline's own
    work without the transformer: scheduler steps, CFG combination, latent preparation)."""
    missing = sorted(set(schedule.counts()) - set(kind_ms))
    if missing:
        raise ValueError(f"no time for the step kind(s) {', '.join(missing)}; time every kind of the schedule")
    return rest_s + sum(n * kind_ms[kind] for kind, n in schedule.counts().items()) / 1e3


def cold_penalty_s(first: Sequence[tuple[str, float]], kind_ms: dict[str, float]) -> float:
    """Seconds a cold generation spends beyond the steady one in its forwards: the skeleton's untimed pass, run in
    a new process on empty caches, is the first forward of every kind (Triton JIT, autotuning, inductor, the
    per-process plans, cuDNN / cuBLAS set-up); each forward's excess over its kind's steady time, summed. Every later
    forward of a kind finds that work done, so the cold whole is the steady composition plus this."""
    return sum(ms - kind_ms[kind] for kind, ms in first) / 1e3


def dense_schedule(num_steps: int, passes: Sequence[str]) -> Schedule:
    """The schedule of a configuration without a method: every forward the same kind."""
    return Schedule(tuple(passes), tuple(("forward",) * len(passes) for _ in range(num_steps)))
